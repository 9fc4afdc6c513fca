"""Routed-expert weights in FP8 for serving: half the bytes a decode step streams.

At 32 decode rows and more a step's tokens touch nearly every expert of every layer, so each step reads all the
routed-expert weights (28.8 GB in bf16 on the DeepSeek-V2-Lite shape: ~6.7 ms of the H200's ~4.3 TB/s, the floor
under a 32-row step). Held as float8 e4m3 with one fp32 scale per output row of each expert, they take half of
that. Weight-only: the activations stay in the model's dtype, the decode kernel widens each weight tile to it
before the product and applies the row scales to the fp32 sum (:mod:`dsft.kernels.moe_gemm`), and larger steps
(prefill) widen one layer's experts at a time (:func:`dequantize`).

The rounding: e4m3 keeps 3 mantissa bits, a relative step of 2^-4 at worst, per weight; with the row's largest
magnitude mapped to 448 (e4m3's largest finite value) no weight of the row saturates.
"""
from __future__ import annotations

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
    """The weight :func:`quantize_rows` holds, in ``dtype``."""
    return (q.to(torch.float32) * scale.unsqueeze(-1)).to(dtype)
