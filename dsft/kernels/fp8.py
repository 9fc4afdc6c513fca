"""Routed-expert weights in FP8 for serving: half the bytes a decode step streams.

At 32 decode rows and more a step's tokens touch nearly every expert of every layer, so each step reads all the
routed-expert weights (28.8 GB in bf16 on the DeepSeek-V2-Lite shape: ~6.7 ms of the H200's ~4.3 TB/s, the floor
under a 32-row step). Held as float8 e4m3 with one fp32 scale per output row of each expert, they take half of
that. Weight-only: the activations stay in the model's dtype, the decode kernel widens each weight tile to it
before the product and applies the row scales to the fp32 sum (:mod:`dsft.kernels.moe_gemm`), and larger steps
(prefill) widen one layer's experts at a time (:func:`dequantize`, one Triton pass on a GPU).

The rounding: e4m3 keeps 3 mantissa bits, a relative step of 2^-4 at worst, per weight; with the row's largest
magnitude mapped to 448 (e4m3's largest finite value) no weight of the row saturates.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


class Fp8Weight(NamedTuple):
    """``weight[..., n, k] ~= q[..., n, k] * scale[..., n]``."""

    q: torch.Tensor
    scale: torch.Tensor


def quantize_rows(weight: torch.Tensor) -> Fp8Weight:
    """``weight`` [..., N, K] -> e4m3 values and one fp32 scale per row (its largest magnitude over 448; 1 for a row
    of zeros)."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=-1) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return Fp8Weight((w / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight :func:`quantize_rows` holds, in ``dtype``: each value widened to fp32, times its row's scale, rounded
    once. On a GPU in one Triton pass (:mod:`dsft.kernels.fp8_triton`): the torch ops below write and read fp32
    copies of the whole weight twice (DeepSeek-V2-Lite's routed experts of one layer: 0.55 GB of FP8 became ~10 GB of
    traffic and 4.4 GB of temporaries in every prefill, computed from the shapes); the same arithmetic and rounding."""
    from dsft.kernels import moe_gemm

    if (moe_gemm.runs_on(q, half=False) and q.is_contiguous() and scale.is_contiguous() and q.numel() > 0 and os.environ.get("DSFT_TRITON_FP8", "1") != "0"):
        out = moe_gemm.or_none(_dequantize_kernel, q, scale, dtype)
        if out is not None:
            return out
    return dequantize_reference(q, scale, dtype)


def dequantize_reference(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize` in torch ops."""
    return (q.to(torch.float32) * scale.unsqueeze(-1)).to(dtype)


def _dequantize_kernel(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    from dsft.kernels import fp8_triton

    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    K = q.shape[-1]
    rows = q.numel() // K
    block = 8
    fp8_triton.dequantize_kernel[(-(-rows // block),)](q, scale, out, rows, K, ROWS=block, BLOCK_K=256)
    return out
