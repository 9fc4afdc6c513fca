"""Kernel-time profile of one training step of a train_throughput variant (top kernels by CUDA time), and
where the step's wall time goes: the host's time to enqueue a step vs the synchronised step time.
An enqueue time close to the step time means the GPU waits on Python (launch-bound), not on kernels.

    python benchmarks/profile_step.py dsft_lora --compile [--layers 27] [--top 0]
    python benchmarks/profile_step.py dsft_lora --compile --bs 5 --seq 6144 --packed --probe   # as ``dsft train --data`` steps

``--packed``: rows of SFT-like examples packed as ``dsft train`` packs them (position ids restarting per
example, labels only on responses); ``--probe``: the router probe (load-balancing loss) as in training;
``--attn``: the attention implementation (dsft_varlen, flex_attention, sdpa, eager).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.train_throughput import compile_layers, packed_batch, prepare, release, with_seq_lens  # noqa: E402
from dsft.eval.losses import causal_lm_loss, lm_loss  # noqa: E402

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("variant")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--dense-fold", action="store_true", help="dsft LoRA variants: also fold attention/shared-expert LoRA A")
    p.add_argument("--compile-mode", help="torch.compile mode, e.g. reduce-overhead")
    p.add_argument("--inductor", action="append", metavar="KEY=VALUE", help="torch._inductor.config setting; repeatable")
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--host", action="store_true", help="also profile the host side of one step")
    p.add_argument("--packed", action="store_true", help="packed SFT-like rows instead of dense random rows")
    p.add_argument("--probe", action="store_true", help="with the router probe's load-balancing loss")
    p.add_argument("--attn", help="attention implementation, e.g. flex_attention")
    p.add_argument("--no-cudnn", action="store_true", help="SDPA without cuDNN attention, as dsft train runs")
    a = p.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(not a.no_cudnn)
    model, layers, trainable = prepare(a.variant, a.layers, 16, a.dense_fold)
    if a.attn == "dsft_varlen":
        from dsft.kernels.varlen import register

        register()
    if a.attn:
        model.set_attn_implementation(a.attn)
    if a.compile:
        compile_layers(layers, a.compile_mode, a.inductor)
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True) if trainable else None
    x = torch.randint(0, 102400, (a.bs, a.seq), device="cuda")
    batch = packed_batch(a.bs, a.seq) if a.packed else {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}
    if a.attn == "dsft_varlen":
        batch = with_seq_lens(batch)
    probe = None
    if a.probe:
        from dsft.base.arch import ARCHITECTURES
        from dsft.base.router import RouterProbe

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        probe = RouterProbe(base, ARCHITECTURES["deepseek_v2"])

    def step():
        if probe:
            probe.reset(batch["attention_mask"])
        loss = lm_loss(model, batch) if a.variant.startswith("dsft") else causal_lm_loss(model(input_ids=x, use_cache=False).logits, x)
        if probe:
            loss = loss + probe.coef * probe.aux_loss()
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    enqueue, wall = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        step()
        enqueue.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - t0)
    if a.host:  # where the host's time goes: Python functions (cProfile) and torch ops (self CPU time)
        import cProfile
        import pstats

        with cProfile.Profile() as cp:
            step()
            torch.cuda.synchronize()
        pstats.Stats(cp).sort_stats("tottime").print_stats(a.top)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.top))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    total = sum(k.device_time_total for k in ka)
    print(json.dumps({"variant": a.variant + ("+compile" if a.compile else "") + ("+packed" if a.packed else "")
                      + ("+probe" if a.probe else "") + (f"+{a.attn}" if a.attn else "") + ("+nocudnn" if a.no_cudnn else ""),
                      "layers": a.layers, "kernel_ms": round(total / 1e3, 1),
                      "step_ms": round(1e3 * sum(wall) / len(wall), 1),
                      "tokens_per_s": round(int(batch["attention_mask"].sum()) * len(wall) / sum(wall)), "enqueue_ms": round(1e3 * sum(enqueue) / len(enqueue), 1)}))
    for k in sorted(ka, key=lambda k: -k.device_time_total)[: a.top]:
        print(f"{k.device_time_total / 1e3:8.1f} ms {100 * k.device_time_total / total:5.1f}% n={k.count:5d}  {k.key[:120]}")
    release()
