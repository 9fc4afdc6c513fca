"""The Triton kernel of :mod:`dsft.kernels.lora_up` (imported only where Triton can run).

``lora_up_kernel``: program (i, j) adds ``(h * mask) B^T`` to rows ``[i * BLOCK_M, ...)`` and columns
``[j * BLOCK_N, ...)`` of ``y`` in place, reading h, the mask and B in place (any strides), summing in fp32 and
rounding once, as a GEMM with beta = 1 does.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def lora_up_kernel(h_ptr, mask_ptr, b_ptr, y_ptr, M, N, R, shm, shr, smm, smr, sbn, sbr, sym, syn,
                   MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows, cols = rm < M, rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        ranks = rr < R
        h = tl.load(h_ptr + rm[:, None] * shm + rr[None, :] * shr, mask=rows[:, None] & ranks[None, :], other=0.0)
        if MASK:
            h = h * tl.load(mask_ptr + rm[:, None] * smm + rr[None, :] * smr, mask=rows[:, None] & ranks[None, :],
                            other=0.0).to(h.dtype)
        b = tl.load(b_ptr + rn[None, :] * sbn + rr[:, None] * sbr, mask=ranks[:, None] & cols[None, :], other=0.0)
        acc += tl.dot(h, b.to(h.dtype))
    out = y_ptr + rm[:, None] * sym + rn[None, :] * syn
    keep = rows[:, None] & cols[None, :]
    acc += tl.load(out, mask=keep, other=0.0).to(tl.float32)
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=keep)


@triton.jit
def swiglu_up_kernel(g_ptr, hg_ptr, bg_ptr, u_ptr, hu_ptr, bu_ptr, mask_ptr, out_ptr, M, N, R,
                     sgm, sgn, shgm, shgr, sbgn, sbgr, sum_, sun, shum, shur, sbun, sbur, smm, smr, som, son,
                     MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """``silu(g + (hg * mask) Bg^T) * (u + (hu * mask) Bu^T)`` for rows ``[i * BLOCK_M, ...)`` and columns
    ``[j * BLOCK_N, ...)``: each up-projection summed in fp32 onto its base and rounded (as :func:`lora_up_kernel`
    leaves it), the activation rounded, the product rounded, as the torch ops round them."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows, cols = rm < M, rn < N
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        ranks = rr < R
        both = rows[:, None] & ranks[None, :]
        hg = tl.load(hg_ptr + rm[:, None] * shgm + rr[None, :] * shgr, mask=both, other=0.0)
        hu = tl.load(hu_ptr + rm[:, None] * shum + rr[None, :] * shur, mask=both, other=0.0)
        if MASK:
            m = tl.load(mask_ptr + rm[:, None] * smm + rr[None, :] * smr, mask=both, other=0.0)
            hg = hg * m.to(hg.dtype)
            hu = hu * m.to(hu.dtype)
        bg = tl.load(bg_ptr + rn[None, :] * sbgn + rr[:, None] * sbgr, mask=ranks[:, None] & cols[None, :], other=0.0)
        bu = tl.load(bu_ptr + rn[None, :] * sbun + rr[:, None] * sbur, mask=ranks[:, None] & cols[None, :], other=0.0)
        acc_g += tl.dot(hg, bg.to(hg.dtype))
        acc_u += tl.dot(hu, bu.to(hu.dtype))
    keep = rows[:, None] & cols[None, :]
    dtype = out_ptr.dtype.element_ty
    g = (acc_g + tl.load(g_ptr + rm[:, None] * sgm + rn[None, :] * sgn, mask=keep, other=0.0).to(tl.float32)).to(dtype)
    u = (acc_u + tl.load(u_ptr + rm[:, None] * sum_ + rn[None, :] * sun, mask=keep, other=0.0).to(tl.float32)).to(dtype)
    g32 = g.to(tl.float32)
    act = (g32 / (1.0 + tl.exp(-g32))).to(dtype)
    tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, (act.to(tl.float32) * u.to(tl.float32)).to(dtype), mask=keep)
