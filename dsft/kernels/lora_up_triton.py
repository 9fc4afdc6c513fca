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
