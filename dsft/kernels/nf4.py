"""Frozen weights in 4-bit NF4 (QLoRA, Dettmers et al. 2023), through bitsandbytes' quantisation ops.

A weight is quantised in blocks of 64 consecutive values: each block keeps one fp32 absmax and 64
4-bit codes of the NF4 table (two per byte), 4.5 bits a value in all. A fused expert weight
[E, out, in] is quantised as one flat tensor; since out * in is a multiple of 64 no block spans two
experts, so this is per-expert quantisation with one call. Weights are dequantised to the compute
dtype right where they are used and dropped after: under activation checkpointing only the layer
being recomputed holds dequantised copies.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 64


def _ops():
    from dsft.extras import require

    require("qlora", "4-bit (NF4) training")  # importing bitsandbytes registers torch.ops.bitsandbytes
    return torch.ops.bitsandbytes


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (any shape, numel a multiple of 64) -> (packed uint8 codes [numel/2, 1], fp32 absmax [numel/64])."""
    if w.numel() % BLOCK:
        raise ValueError(f"NF4 needs a multiple of {BLOCK} values, got {w.numel()} ({list(w.shape)})")
    return _ops().quantize_4bit(w.detach().reshape(-1), BLOCK, "nf4", torch.uint8)


def dequantize(packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The weight in ``dtype``. Runs inside compiled decoder layers: it calls the registered op directly (no import
    check, which :class:`Nf4Tensor` made when it quantised), so torch.compile traces it as one op. The import check
    here broke every compiled layer's graph at each weight (41 graph breaks and 34 recompiles a step, H200, lite
    shape: 855 ms of host time a step for 162 ms of kernels)."""
    # Flat, then viewed: bitsandbytes 0.50's CPU kernel lays a multi-dimensional shape out wrongly.
    return torch.ops.bitsandbytes.dequantize_4bit(packed, absmax, BLOCK, "nf4", [math.prod(shape)], dtype).view(shape)


class Nf4Tensor(nn.Module):
    """One frozen weight held in NF4; calling it gives the weight in ``dtype`` (a fresh tensor each time).

    A module (not a tensor subclass) so that ``.to()``/``.cuda()`` move its codes with the model and
    ``state_dict`` shows what is stored.
    """

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        w = weight.detach().to(device or weight.device)
        packed, absmax = quantize(w)
        self.register_buffer("packed", packed)
        self.register_buffer("absmax", absmax)
        self.shape = tuple(weight.shape)
        self.dtype = dtype or weight.dtype

    def forward(self) -> torch.Tensor:
        return dequantize(self.packed, self.absmax, self.shape, self.dtype)

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, dtype={self.dtype}, nf4 blocks of {BLOCK}"


class Nf4Linear(nn.Module):
    """``nn.Linear`` with its frozen weight in NF4 (bias, if any, kept as is)."""

    def __init__(self, linear: nn.Linear, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.nf4 = Nf4Tensor(linear.weight, device=device)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(device or linear.bias.device),
                                                                   requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.nf4().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, nf4"
