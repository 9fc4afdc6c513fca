"""Kernel-time profile of one training step of a train_throughput variant (top kernels by CUDA time).

    python benchmarks/profile_step.py dsft_lora --compile [--layers 27]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.train_throughput import prepare  # noqa: E402
from dsft.recipes.loop import causal_lm_loss, lm_loss  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("variant")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--top", type=int, default=30)
    a = p.parse_args()
    model, layers, trainable = prepare(a.variant, a.layers, 16)
    if a.compile:
        for layer in layers:
            layer.compile()
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True) if trainable else None
    x = torch.randint(0, 102400, (a.bs, a.seq), device="cuda")

    def step():
        batch = {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}
        loss = lm_loss(model, batch) if a.variant.startswith("dsft") else causal_lm_loss(model(input_ids=x, use_cache=False).logits, x)
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    total = sum(k.device_time_total for k in ka)
    print(f"== {a.variant}{'+compile' if a.compile else ''}: total CUDA time {total / 1e3:.1f} ms")
    for k in sorted(ka, key=lambda k: -k.device_time_total)[: a.top]:
        print(f"{k.device_time_total / 1e3:8.1f} ms {100 * k.device_time_total / total:5.1f}% n={k.count:5d}  {k.key[:120]}")
