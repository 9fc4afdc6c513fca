"""The Triton kernels of :mod:`dsft.kernels.mla_absorb` (imported only where Triton can run).

Program (h, j, i): head h, output columns ``[j * BLOCK, ...)``, rows ``[i * BLOCK_B, ...)``. The base product and,
with ``LORA``, the low-rank one (rank blocks of ``BLOCK_R``: the low-rank values of a block, masked, rounded to the
inputs' dtype as the torch ops round them, times A or B) accumulate in fp32, rounded once at the store.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def absorb_query_kernel(q_ptr, w_ptr, b_ptr, a_ptr, m_ptr, out_ptr, ROWS, C, R, DN,
                        sqb, sqh, sqd, swh, swd, swc, sbh, sbd, sbr, sar, sac, smb, smr, soh, sob, soc,
                        LORA: tl.constexpr, MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):
    """q_lat[h, rows, cols] = q_nope[rows, h] W_UK[h][:, cols] (+ ((q_nope[rows, h] B_UK[h]) * m) A[:, cols])."""
    h = tl.program_id(0)
    rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rb = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows, cols = rb < ROWS, rc < C
    q_base = q_ptr + h * sqh + rb[:, None] * sqb
    acc = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for d0 in range(0, DN, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        dims = rd < DN
        q = tl.load(q_base + rd[None, :] * sqd, mask=rows[:, None] & dims[None, :], other=0.0)
        w = tl.load(w_ptr + h * swh + rd[:, None] * swd + rc[None, :] * swc, mask=dims[:, None] & cols[None, :], other=0.0)
        acc += tl.dot(q, w.to(q.dtype))
    if LORA:
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            ranks = rr < R
            low = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
            for d0 in range(0, DN, BLOCK_D):
                rd = d0 + tl.arange(0, BLOCK_D)
                dims = rd < DN
                q = tl.load(q_base + rd[None, :] * sqd, mask=rows[:, None] & dims[None, :], other=0.0)
                bl = tl.load(b_ptr + h * sbh + rd[:, None] * sbd + rr[None, :] * sbr, mask=dims[:, None] & ranks[None, :],
                             other=0.0)
                low += tl.dot(q, bl.to(q.dtype))
            low = low.to(q_ptr.dtype.element_ty)
            if MASK:
                low = low * tl.load(m_ptr + rb[:, None] * smb + rr[None, :] * smr, mask=rows[:, None] & ranks[None, :],
                                    other=0.0).to(low.dtype)
            a = tl.load(a_ptr + rr[:, None] * sar + rc[None, :] * sac, mask=ranks[:, None] & cols[None, :], other=0.0)
            acc += tl.dot(low, a.to(low.dtype))
    out = out_ptr + h * soh + rb[:, None] * sob + rc[None, :] * soc
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] & cols[None, :])


@triton.jit
def absorb_output_kernel(o_ptr, w_ptr, b_ptr, a_ptr, m_ptr, out_ptr, ROWS, C, R, DV,
                         soh, sob, soc, swh, swv, swc, sbh, sbv, sbr, sar, sac, smb, smr, syb, syn,
                         LORA: tl.constexpr, MASK: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[rows, h * DV + v] = o_lat[h, rows] W_UV[h][v]^T (+ ((o_lat[h, rows] A^T) * m) B_UV[h][v]^T)."""
    h = tl.program_id(0)
    rv = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    rb = tl.program_id(2) * BLOCK_B + tl.arange(0, BLOCK_B)
    rows, vals = rb < ROWS, rv < DV
    o_base = o_ptr + h * soh + rb[:, None] * sob
    acc = tl.zeros((BLOCK_B, BLOCK_V), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        cols = rc < C
        o = tl.load(o_base + rc[None, :] * soc, mask=rows[:, None] & cols[None, :], other=0.0)
        w = tl.load(w_ptr + h * swh + rv[None, :] * swv + rc[:, None] * swc, mask=cols[:, None] & vals[None, :], other=0.0)
        acc += tl.dot(o, w.to(o.dtype))
    if LORA:
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            ranks = rr < R
            low = tl.zeros((BLOCK_B, BLOCK_R), dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                rc = c0 + tl.arange(0, BLOCK_C)
                cols = rc < C
                o = tl.load(o_base + rc[None, :] * soc, mask=rows[:, None] & cols[None, :], other=0.0)
                a = tl.load(a_ptr + rr[None, :] * sar + rc[:, None] * sac, mask=cols[:, None] & ranks[None, :], other=0.0)
                low += tl.dot(o, a.to(o.dtype))
            low = low.to(o_ptr.dtype.element_ty)
            if MASK:
                low = low * tl.load(m_ptr + rb[:, None] * smb + rr[None, :] * smr, mask=rows[:, None] & ranks[None, :],
                                    other=0.0).to(low.dtype)
            bu = tl.load(b_ptr + h * sbh + rv[None, :] * sbv + rr[:, None] * sbr, mask=ranks[:, None] & vals[None, :],
                         other=0.0)
            acc += tl.dot(low, bu.to(low.dtype))
    out = out_ptr + rb[:, None] * syb + (h * DV + rv[None, :]) * syn
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=rows[:, None] & vals[None, :])
