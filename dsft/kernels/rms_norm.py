"""Llama's RMSNorm (every MoE model the runtime serves copies it) in one Triton kernel, with transformers' rounding.

transformers computes ``weight * (x.float() * rsqrt(mean(x.float() ** 2) + eps)).to(x.dtype)``: the normalised row
rounded to x's dtype, then the weight product rounded again. The runtime's torch path
(:mod:`dsft.runtime.fused_norms`) takes two kernels for it (``F.rms_norm``, then the product); a decode step holds
two norms a layer plus the final one (55 on the DeepSeek-V2-Lite shape), each kernel ~2-3 us on an H200 whatever it
does. Here one program normalises one row and multiplies it by the weight, both roundings kept (decode sizes: up to
:data:`MAX_ROWS` rows).
:func:`rms_norm_reference` is the torch path (the CPU's, and the tests' oracle, the kernel running in Triton's
interpreter there).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from dsft.kernels import moe_gemm

MAX_WIDTH = 16384
"""Row widths up to which one program holds a row (hidden sizes of the served models are 2,048-7,168)."""
MAX_ROWS = 256
"""Rows up to which the kernel runs (a decode step's, where kernel count is what costs; a long prefill keeps the
torch path, whose two kernels cost less host time to launch eagerly)."""


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """CUDA in half precision (or the interpreter), the weight in x's dtype, a row that fits one program, decode
    sizes, unless ``DSFT_TRITON_NORM=0`` (to compare against the torch ops)."""
    return (moe_gemm.runs_on(x) and weight.dtype == x.dtype and weight.dim() == 1 and x.shape[-1] == weight.shape[0]
            and x.shape[-1] <= MAX_WIDTH and x.numel() <= MAX_ROWS * x.shape[-1]
            and os.environ.get("DSFT_TRITON_NORM", "1") != "0")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x`` [..., H] (its last dimension contiguous) -> ``weight * rms_normalised(x)`` in x's dtype."""
    moe_gemm.require("RMSNorm kernel")
    from dsft.kernels import rms_norm_triton

    H = x.shape[-1]
    rows = x.reshape(-1, H)
    out = torch.empty_like(rows)
    if rows.shape[0] == 0:
        return out.view(x.shape)
    rms_norm_triton.rms_norm_kernel[(rows.shape[0],)](
        rows, weight, out, H, rows.stride(0), out.stride(0), eps, BLOCK=max(16, 1 << (H - 1).bit_length()))
    return out.view(x.shape)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """:func:`rms_norm` in torch ops: ``F.rms_norm`` (fp32 inside, rounded to x's dtype), then the weight product."""
    return weight * F.rms_norm(x, (x.shape[-1],), None, eps)
