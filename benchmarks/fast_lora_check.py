"""Correctness of dsft's fast expert LoRA at full DeepSeek-V2-Lite width on the GPU: loss and every LoRA
gradient against PEFT's target_parameters forward on the same weights and inputs, in fp32 (both exact
up to rounding) and in bf16 (both paths' distance from the fp32 reference, side by side).

    python benchmarks/fast_lora_check.py [--layers 4] [--seq 1024]
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.train_throughput import build_model
from dsft.adapters.fast_lora import (
    enable_fast_lora,
    fold_lora,
)
from dsft.adapters.lora import LoraSettings, attach_lora
from dsft.base.arch import ARCHITECTURES
from dsft.eval.losses import causal_lm_loss


def loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss(model(input_ids=x, use_cache=False).logits, x)
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--bs", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--dense-fold", action="store_true", help="also fold attention/shared-expert LoRA A (fold_lora(dense=True))")
    a = p.parse_args()
    model = attach_lora(build_model(a.layers), ARCHITECTURES["deepseek_v2"], LoraSettings(r=16, alpha=32), fast=False)
    model.enable_input_require_grads()
    with torch.no_grad():
        for n, prm in model.named_parameters():
            if "lora_B" in n:
                prm.normal_(0, 0.01)
    x = torch.randint(0, 102400, (a.bs, a.seq), device="cuda")
    ref_loss, ref = loss_and_grads(model, x)              # PEFT's forward, bf16
    model32 = copy.deepcopy(model).float()                # the same weights in fp32, before any dsft patching
    ref32_loss, ref32 = loss_and_grads(model32, x)        # PEFT's forward in fp32: the precise reference
    patched32, folded32 = enable_fast_lora(model32), fold_lora(model32, dense=a.dense_fold)
    fast32_loss, fast32 = loss_and_grads(model32, x)      # dsft's forward in fp32 (grouped GEMMs as per-expert loops)
    del model32
    torch.cuda.empty_cache()
    patched = enable_fast_lora(model)
    folded = fold_lora(model, dense=a.dense_fold)  # as dsft train does on one GPU
    fast_loss, fast = loss_and_grads(model, x)            # dsft's forward, bf16 (grouped-GEMM kernels)

    def rel(a_, b_):
        return ((a_ - b_).norm() / b_.norm().clamp(min=1e-12)).item()

    def by_group(grads, against):
        out = {}
        for n in against:
            key = "experts" if ".experts." in n else "shared" if "shared" in n else "attention"
            out[key] = float(f"{max(out.get(key, 0.0), rel(grads[n], against[n])):.3g}")
        return out

    print(json.dumps(dict(
        layers=a.layers, patched=patched, folded=folded, n_grads=len(ref), peft_bf16_loss=ref_loss, fast_bf16_loss=fast_loss, fp32_loss=ref32_loss,
        patched_fp32=patched32, folded_fp32=folded32, fast_fp32_loss=fast32_loss, fast_vs_peft_fp32=by_group(fast32, ref32),
        fast_vs_peft_bf16=by_group(fast, ref), fast_vs_fp32=by_group(fast, ref32), peft_bf16_vs_fp32=by_group(ref, ref32),
    )), flush=True)
