"""The Triton kernel of :func:`dsft.kernels.fp8.dequantize` (imported only where Triton can run).

``dequantize_kernel``: program i widens rows ``[i * ROWS, (i + 1) * ROWS)`` of FP8 values ``[rows, K]``: each value
to fp32, times its row's fp32 scale, rounded once to the output's dtype; the same arithmetic as the torch ops, in
one pass over the bytes instead of five.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dequantize_kernel(q_ptr, scale_ptr, out_ptr, n_rows, K, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = rows < n_rows
    scale = tl.load(scale_ptr + rows, mask=live, other=0.0)
    base = rows.to(tl.int64)[:, None] * K
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        keep = live[:, None] & (cols[None, :] < K)
        q = tl.load(q_ptr + base + cols[None, :], mask=keep, other=0.0).to(tl.float32)
        # rounded to nearest even as torch rounds (Triton's default on a GPU; its CPU interpreter truncates bf16)
        tl.store(out_ptr + base + cols[None, :], (q * scale[:, None]).to(out_ptr.dtype.element_ty), mask=keep)
