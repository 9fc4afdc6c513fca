"""DeepSeek-V2's ``kv_b_proj`` folded into the decode query and output, its per-row LoRA with it, in one kernel each.

The absorbed decode attention (:mod:`dsft.runtime.mla_decode`) turns each head's query into latent space before
attending and each head's attended latent back into a value after it, per head h (``W_UK[h]`` / ``W_UV[h]`` the key
/ value rows of ``kv_b_proj``; the runtime's per-row LoRA on it ``A`` [R, C], ``B_UK[h]`` / ``B_UV[h]``, the column
mask m keeping each row's own adapter's rank block):

    q_lat[h] = q_nope[h] W_UK[h] + ((q_nope[h] B_UK[h]) * m) A
    out[h]   = o_lat[h] W_UV[h]^T + ((o_lat[h] A^T) * m) B_UV[h]^T

In torch ops that is nine kernels a layer (two batched GEMMs, the mask product and an accumulating GEMM on each
side, and the copy of the output into o_proj's [rows, heads x value] layout), each ~2-3 us on an H200 whatever it
does. Here :func:`absorb_query` and :func:`absorb_output` are one kernel each: a program holds one head, a block of
rows and a block of output columns, sums in fp32 and rounds once, reads the strided views as they are and writes the
output in the layout its consumer takes (``q_lat`` [heads, rows, C] for :func:`dsft.kernels.mla_attention.attend`,
``out`` [rows, heads x value] for ``o_proj``). Decode sizes only (up to :data:`MAX_ROWS` rows).
:func:`absorb_query_reference` and :func:`absorb_output_reference` are the torch ops (the runtime's path off a
GPU, and the CPU tests' oracle, the kernels running in Triton's interpreter there).
"""
from __future__ import annotations

import os

import torch

from dsft.kernels import moe_gemm

MAX_ROWS = 256
"""Rows up to which the kernels run (a decode step's)."""

Lora = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]
"""``(A [R, C], B [heads, width, R], column mask [rows, R] or None)``: one side's LoRA (B_UK or B_UV)."""


def usable(x: torch.Tensor) -> bool:
    """CUDA in half precision (or the interpreter), Triton available, decode sizes (``x``: [rows, ...]), unless
    ``DSFT_TRITON_ABSORB=0`` (to compare against the torch ops)."""
    return moe_gemm.runs_on(x) and x.shape[0] <= MAX_ROWS and os.environ.get("DSFT_TRITON_ABSORB", "1") != "0"


def _blocks(rows: int, R: int) -> tuple[int, int]:
    return max(16, min(64, 1 << (rows - 1).bit_length())), max(16, min(64, 1 << (max(R, 1) - 1).bit_length()))


def absorb_query(q_nope: torch.Tensor, w_uk: torch.Tensor, lora: Lora | None) -> torch.Tensor:
    """``q_nope`` [rows, heads, dn], ``w_uk`` [heads, dn, C] (any strides) -> ``q_lat`` [heads, rows, C]."""
    moe_gemm.require("MLA absorb kernels")
    from dsft.kernels import mla_absorb_triton

    b, nh, dn = q_nope.shape
    C = w_uk.shape[-1]
    out = torch.empty((nh, b, C), dtype=q_nope.dtype, device=q_nope.device)
    if b == 0:
        return out
    A, B, mask = lora if lora is not None else (w_uk, w_uk, None)  # unused without LORA: any tensors
    R = A.shape[0] if lora is not None else 0
    m = mask if mask is not None else q_nope
    block_b, block_r = _blocks(b, R)
    block_c = 128
    mla_absorb_triton.absorb_query_kernel[(nh, -(-C // block_c), -(-b // block_b))](
        q_nope, w_uk, B, A, m, out, b, C, R, dn,
        q_nope.stride(0), q_nope.stride(1), q_nope.stride(2), w_uk.stride(0), w_uk.stride(1), w_uk.stride(2),
        B.stride(0), B.stride(1), B.stride(-1), A.stride(0), A.stride(1), m.stride(0), m.stride(-1),
        out.stride(0), out.stride(1), out.stride(2),
        LORA=lora is not None, MASK=mask is not None, BLOCK_B=block_b, BLOCK_C=block_c, BLOCK_D=64, BLOCK_R=block_r)
    return out


def absorb_output(o_lat: torch.Tensor, w_uv: torch.Tensor, lora: Lora | None) -> torch.Tensor:
    """``o_lat`` [heads, rows, C], ``w_uv`` [heads, dv, C] (any strides) -> ``out`` [rows, heads x dv]."""
    moe_gemm.require("MLA absorb kernels")
    from dsft.kernels import mla_absorb_triton

    nh, b, C = o_lat.shape
    dv = w_uv.shape[1]
    out = torch.empty((b, nh * dv), dtype=o_lat.dtype, device=o_lat.device)
    if b == 0:
        return out
    A, B, mask = lora if lora is not None else (w_uv, w_uv, None)
    R = A.shape[0] if lora is not None else 0
    m = mask if mask is not None else o_lat
    block_b, block_r = _blocks(b, R)
    block_v = max(16, min(128, 1 << (dv - 1).bit_length()))
    mla_absorb_triton.absorb_output_kernel[(nh, -(-dv // block_v), -(-b // block_b))](
        o_lat, w_uv, B, A, m, out, b, C, R, dv,
        o_lat.stride(0), o_lat.stride(1), o_lat.stride(2), w_uv.stride(0), w_uv.stride(1), w_uv.stride(2),
        B.stride(0), B.stride(1), B.stride(-1), A.stride(0), A.stride(1), m.stride(0), m.stride(-1),
        out.stride(0), out.stride(1),
        LORA=lora is not None, MASK=mask is not None, BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_C=64, BLOCK_R=block_r)
    return out


def absorb_query_reference(q_nope: torch.Tensor, w_uk: torch.Tensor, lora: Lora | None) -> torch.Tensor:
    """:func:`absorb_query` in torch ops."""
    b, nh, dn = q_nope.shape
    q_heads = q_nope.transpose(0, 1)  # [nh, b, dn]
    q_lat = torch.bmm(q_heads, w_uk)  # [nh, b, C]
    if lora is not None:
        A, B_uk, mask = lora
        low = torch.bmm(q_heads, B_uk)  # [nh, b, R]
        if mask is not None:
            low = low * mask
        q_lat.view(nh * b, A.shape[1]).addmm_(low.reshape(nh * b, A.shape[0]), A)
    return q_lat


def absorb_output_reference(o_lat: torch.Tensor, w_uv: torch.Tensor, lora: Lora | None) -> torch.Tensor:
    """:func:`absorb_output` in torch ops."""
    nh, b, C = o_lat.shape
    out = torch.bmm(o_lat, w_uv.transpose(1, 2))  # [nh, b, dv]
    if lora is not None:
        A, B_uv, mask = lora
        low = (o_lat.reshape(nh * b, C) @ A.t()).view(nh, b, A.shape[0])
        if mask is not None:
            low = low * mask
        out = torch.baddbmm(out, low, B_uv.transpose(1, 2))
    return out.transpose(0, 1).reshape(b, nh * w_uv.shape[1])
