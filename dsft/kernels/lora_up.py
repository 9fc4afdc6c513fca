"""A LoRA up-projection added in place with each row's rank mask, in one kernel: ``y += (h * mask) B^T``.

The runtime's LoRA linear in a decode step is ``[y | h] = x [W; A]^T`` (:mod:`dsft.runtime.fused_linear`), then
``y += (h * mask) B^T``, where the column mask keeps each row's own adapter's rank block. In torch ops that is two
kernels: the mask product (a non-contiguous elementwise kernel, h being a slice of the GEMM's output) and the
accumulating GEMM. A decode step is bound by its kernels' count (each ~2-3 us on an H200 whatever it does), and
it has six such linears a layer (DeepSeek-V2: q_proj, kv_a_proj_with_mqa, o_proj, the shared experts' three), so
the product goes into the GEMM's load here. Decode sizes only (up to :data:`MAX_ROWS` rows); larger ones keep
cuBLAS. :func:`lora_up_reference` is the torch ops (the CPU's path and the tests' oracle, the kernel running in
Triton's interpreter there).

:func:`swiglu_up` does it for a SwiGLU MLP's gate and up projections at once and applies the activation, writing
``silu(gate) * up`` (DeepSeek-V2's and Qwen-MoE's shared experts, DeepSeek-V2's dense first layer): one kernel where
the torch ops take four (two masked up-projections, the activation, the product).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from dsft.kernels import moe_gemm

MAX_ROWS = 256
"""Rows up to which the kernel runs (a decode step's; a prefill's many rows are cuBLAS's)."""


def usable(y: torch.Tensor, h: torch.Tensor) -> bool:
    """Triton present, CUDA in half precision (or the interpreter), few rows, unless ``DSFT_TRITON_LORA=0``."""
    return (moe_gemm.runs_on(y) and y.dim() == 2 and h.dim() == 2 and y.shape[0] <= MAX_ROWS
            and os.environ.get("DSFT_TRITON_LORA", "1") != "0")


def lora_up_(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``y += (h * mask) B^T`` in place and returned: ``y`` [M, N], ``h`` [M, R], ``B`` [N, R], ``mask`` [M, R] or None
    (any strides)."""
    moe_gemm.require("LoRA kernel")
    from dsft.kernels import lora_up_triton

    M, N = y.shape
    R = h.shape[1]
    if M == 0:
        return y
    block_m = max(16, min(64, 1 << (M - 1).bit_length()))
    block_r = max(16, min(64, 1 << (R - 1).bit_length()))
    block_n = 32
    m = mask if mask is not None else h  # unused without MASK: any tensor
    lora_up_triton.lora_up_kernel[(-(-M // block_m), -(-N // block_n))](
        h, m, B, y, M, N, R, h.stride(0), h.stride(1), m.stride(0), m.stride(1), B.stride(0), B.stride(1),
        y.stride(0), y.stride(1), MASK=mask is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r)
    return y


def lora_up_reference(y: torch.Tensor, h: torch.Tensor, B: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`lora_up_` in torch ops."""
    if mask is not None:
        h = h * mask
    return y.addmm_(h, B.t())


def swiglu_up(g: torch.Tensor, hg: torch.Tensor, Bg: torch.Tensor, u: torch.Tensor, hu: torch.Tensor, Bu: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
    """``silu(g + (hg * mask) Bg^T) * (u + (hu * mask) Bu^T)`` [M, N] in g's dtype: ``g``, ``u`` [M, N], ``hg``, ``hu``
    [M, R], ``Bg``, ``Bu`` [N, R], ``mask`` [M, R] or None (any strides; g and u are left as they were)."""
    moe_gemm.require("LoRA kernel")
    from dsft.kernels import lora_up_triton

    M, N = g.shape
    R = hg.shape[1]
    out = g.new_empty((M, N))
    if M == 0:
        return out
    block_m = max(16, min(64, 1 << (M - 1).bit_length()))
    block_r = max(16, min(64, 1 << (R - 1).bit_length()))
    block_n = 32
    m = mask if mask is not None else hg
    lora_up_triton.swiglu_up_kernel[(-(-M // block_m), -(-N // block_n))](
        g, hg, Bg, u, hu, Bu, m, out, M, N, R, g.stride(0), g.stride(1), hg.stride(0), hg.stride(1),
        Bg.stride(0), Bg.stride(1), u.stride(0), u.stride(1), hu.stride(0), hu.stride(1), Bu.stride(0), Bu.stride(1),
        m.stride(0), m.stride(1), out.stride(0), out.stride(1),
        MASK=mask is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r)
    return out


def swiglu_up_reference(g: torch.Tensor, hg: torch.Tensor, Bg: torch.Tensor, u: torch.Tensor, hu: torch.Tensor,
                        Bu: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """:func:`swiglu_up` in torch ops."""
    gate = lora_up_reference(g.clone(), hg, Bg, mask)
    return F.silu(gate) * lora_up_reference(u.clone(), hu, Bu, mask)
