"""The Triton kernel of :mod:`dsft.kernels.moe_gemm` (imported by it only where Triton can run).

Program (e, j) computes columns ``[j * BLOCK_N, (j + 1) * BLOCK_N)`` of expert e's rows ``offs[e-1]:offs[e]`` of
``y = x @ w[e]``, ``BLOCK_M`` rows at a time (one block at decode sizes: each weight tile is read once), looping
over K; an expert without rows returns at once. Accumulates in fp32.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def moe_gemm_kernel(x_ptr, w_ptr, y_ptr, offs_ptr, N, K,
                     sxm, sxk, swe, swk, swn, sym, syn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e = tl.program_id(0)
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offs_ptr + e)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + e.to(tl.int64) * swe + rn[None, :] * swn
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(x_ptr + rm[:, None] * sxm + kk[None, :] * sxk,
                        mask=(rm[:, None] < end) & (kk[None, :] < K), other=0.0)
            b = tl.load(w_rows + kk[:, None] * swk, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc += tl.dot(a, b)
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < end) & (rn[None, :] < N))
