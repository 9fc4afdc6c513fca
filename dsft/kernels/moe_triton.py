"""The Triton kernels of a decode step's routed experts (imported by :mod:`dsft.kernels.moe_gemm` only where Triton
can run): sorting the (token, expert) pairs by expert, the grouped GEMM, and the weighted sum back to tokens.

``moe_route_kernel``: a stable counting sort of the pairs by expert. Pair i's place in the sorted order is the
number of pairs with a smaller expert, plus those with the same expert before it; programs ``[0, cdiv(P, BLOCK))``
place ``BLOCK`` pairs each, the others count each expert's run end (``offs``). At decode sizes (up to 768 pairs)
that is a few thousand comparisons a program, one launch instead of a radix sort and its gathers.

``moe_gemm_kernel``: program (e, j) computes columns ``[j * BLOCK_N, (j + 1) * BLOCK_N)`` of expert e's rows
``offs[e-1]:offs[e]`` of ``y = x @ w[e]``, ``BLOCK_M`` rows at a time (one block at decode sizes: each weight tile
is read once), looping over K; an expert without rows returns at once. Accumulates in fp32. Options (constexpr,
so each variant compiles to only its own code):

- ``GATHER``: pair p's row of ``x`` is row ``tok[p]`` (the tokens themselves, not a gathered copy);
- ``MASK``: pair p's row of ``x`` is multiplied by row ``tok[p]`` of ``mask`` (a LoRA rank-column mask);
- ``ADD``: ``add[p]`` is added to the product (the base experts' output a LoRA up-projection adds to);
- ``GLU``: ``w[e]`` has ``2N`` columns, gate then up, and the output is ``silu(gate) * up`` (N columns);
- ``SCALE``: ``w`` holds FP8 values (:mod:`dsft.kernels.fp8`), widened to x's dtype tile by tile, and column n of
  expert e's product is multiplied by ``scale[e, n]`` before the addend and the activation;
- ``F16`` (with ``SCALE``): the FP8 tiles widen to fp16 instead, and x's tile is rounded to fp16 (saturated at its
  largest value, 65,504) for the product: on Hopper e4m3 -> fp16 is one conversion instruction per two values,
  e4m3 -> bf16 a longer sequence;
- ``A8`` (with ``SCALE``): nothing widens: each row of x is quantised to e4m3 with its own scale (its largest
  magnitude / 448, found in a first pass over K) and the products run on FP8 tensor cores, the row scale applied
  with the weights' after the sum;
- ``SECOND`` (with ``SCALE``): programs past W's column blocks compute ``x @ v[e]`` (``v`` in x's dtype, ``R``
  columns) into columns ``N .. N + R`` of y: an FP8 expert's base product and its adapters' stacked A in one launch
  (in bf16 the runtime stacks A under W in one buffer instead).

``moe_combine_kernel``: ``out[t] = sum_j weight[t, j] * y[pos[t, j]]`` in fp32, pair ``(t, j)`` at sorted place
``pos``.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def moe_route_kernel(ids_ptr, token_ptr, expert_ptr, offs_ptr, pos_ptr, P, E, TOP_K,
                     BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    n_place = tl.cdiv(P, BLOCK)
    if pid < n_place:
        ri = pid * BLOCK + tl.arange(0, BLOCK)
        live = ri < P
        ei = tl.load(ids_ptr + ri, mask=live, other=0).to(tl.int32)
        place = tl.zeros((BLOCK,), dtype=tl.int32)
        for j0 in range(0, P, BLOCK):
            rj = j0 + tl.arange(0, BLOCK)
            ej = tl.load(ids_ptr + rj, mask=rj < P, other=0).to(tl.int32)
            before = (ej[None, :] < ei[:, None]) | ((ej[None, :] == ei[:, None]) & (rj[None, :] < ri[:, None]))
            place += tl.sum((before & (rj[None, :] < P)).to(tl.int32), axis=1)
        tl.store(pos_ptr + ri, place, mask=live)
        tl.store(token_ptr + place, (ri // TOP_K).to(tl.int64), mask=live)
        tl.store(expert_ptr + place, ei.to(tl.int64), mask=live)
    else:
        re = (pid - n_place) * BLOCK_E + tl.arange(0, BLOCK_E)
        ends = tl.zeros((BLOCK_E,), dtype=tl.int32)
        for j0 in range(0, P, BLOCK):
            rj = j0 + tl.arange(0, BLOCK)
            ej = tl.load(ids_ptr + rj, mask=rj < P, other=0).to(tl.int32)
            ends += tl.sum(((ej[None, :] <= re[:, None]) & (rj[None, :] < P)).to(tl.int32), axis=1)
        tl.store(offs_ptr + re, ends, mask=re < E)


@triton.jit
def moe_gemm_kernel(x_ptr, w_ptr, y_ptr, offs_ptr, tok_ptr, mask_ptr, add_ptr, scale_ptr, v_ptr, N, K, R,
                    sxm, sxk, swe, swk, swn, sym, syn, smm, smk, sam, san, sse, ssn, sve, svk, svn,
                    GATHER: tl.constexpr, MASK: tl.constexpr, ADD: tl.constexpr, GLU: tl.constexpr,
                    SCALE: tl.constexpr, F16: tl.constexpr, A8: tl.constexpr, SECOND: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    e = tl.program_id(0)
    start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(offs_ptr + e)
    if SECOND:
        w_blocks = tl.cdiv(N, BLOCK_N)
        if tl.program_id(1) >= w_blocks:
            _second_tiles(x_ptr, v_ptr, y_ptr, tok_ptr, e, start, end, tl.program_id(1) - w_blocks, N, K, R,
                          sxm, sxk, sve, svk, svn, sym, syn, GATHER, BLOCK_M, BLOCK_N, BLOCK_K)
        else:
            _tiles(x_ptr, w_ptr, y_ptr, tok_ptr, mask_ptr, add_ptr, scale_ptr, e, start, end, tl.program_id(1), N, K,
                   sxm, sxk, swe, swk, swn, sym, syn, smm, smk, sam, san, sse, ssn,
                   GATHER, MASK, ADD, GLU, SCALE, F16, A8, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        _tiles(x_ptr, w_ptr, y_ptr, tok_ptr, mask_ptr, add_ptr, scale_ptr, e, start, end, tl.program_id(1), N, K,
               sxm, sxk, swe, swk, swn, sym, syn, smm, smk, sam, san, sse, ssn,
               GATHER, MASK, ADD, GLU, SCALE, F16, A8, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _tiles(x_ptr, w_ptr, y_ptr, tok_ptr, mask_ptr, add_ptr, scale_ptr, e, start, end, col_block, N, K,
           sxm, sxk, swe, swk, swn, sym, syn, smm, smk, sam, san, sse, ssn,
           GATHER: tl.constexpr, MASK: tl.constexpr, ADD: tl.constexpr, GLU: tl.constexpr,
           SCALE: tl.constexpr, F16: tl.constexpr, A8: tl.constexpr,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + e.to(tl.int64) * swe + rn[None, :] * swn
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        live = rm < end
        tok = rm
        if GATHER or MASK:
            tok = tl.load(tok_ptr + rm, mask=live, other=0)
        x_rows = x_ptr + rm[:, None].to(tl.int64) * sxm
        if GATHER:
            x_rows = x_ptr + tok[:, None].to(tl.int64) * sxm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if A8:
            amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                kk = k0 + rk
                a = tl.load(x_rows + kk[None, :] * sxk, mask=live[:, None] & (kk[None, :] < K), other=0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(a.to(tl.float32)), axis=1))
            a_scale = tl.maximum(amax, 1e-12) / 448.0
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(x_rows + kk[None, :] * sxk, mask=live[:, None] & (kk[None, :] < K), other=0.0)
            if MASK:
                m = tl.load(mask_ptr + tok[:, None].to(tl.int64) * smm + kk[None, :] * smk,
                            mask=live[:, None] & (kk[None, :] < K), other=0.0)
                a = a * m.to(a.dtype)
            if A8:
                a = (a.to(tl.float32) / a_scale[:, None]).to(tl.float8e4nv)
            elif F16:
                a = tl.minimum(tl.maximum(a.to(tl.float32), -65504.0), 65504.0).to(tl.float16)
            b = tl.load(w_rows + kk[:, None] * swk, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc += tl.dot(a, b.to(a.dtype))
            if GLU:
                bu = tl.load(w_rows + N * swn + kk[:, None] * swk, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
                up += tl.dot(a, bu.to(a.dtype))
        if A8:
            acc = acc * a_scale[:, None]
            if GLU:
                up = up * a_scale[:, None]
        if SCALE:
            s_rows = scale_ptr + e.to(tl.int64) * sse
            acc = acc * tl.load(s_rows + rn * ssn, mask=rn < N, other=0.0)[None, :]
            if GLU:
                up = up * tl.load(s_rows + (N + rn) * ssn, mask=rn < N, other=0.0)[None, :]
        out_mask = live[:, None] & (rn[None, :] < N)
        if ADD:
            acc += tl.load(add_ptr + rm[:, None] * sam + rn[None, :] * san, mask=out_mask, other=0.0).to(tl.float32)
            if GLU:
                up += tl.load(add_ptr + rm[:, None] * sam + (N + rn[None, :]) * san, mask=out_mask, other=0.0).to(tl.float32)
        if GLU:
            acc = acc / (1.0 + tl.exp(-acc)) * up
        tl.store(y_ptr + rm[:, None] * sym + rn[None, :] * syn, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _second_tiles(x_ptr, v_ptr, y_ptr, tok_ptr, e, start, end, col_block, N, K, R, sxm, sxk, sve, svk, svn, sym, syn,
                  GATHER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # columns N + [col_block * BLOCK_N, ...) of y: x @ v[e], v in x's dtype (an FP8 expert's adapters' stacked A)
    rn = col_block * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    v_rows = v_ptr + e.to(tl.int64) * sve + rn[None, :] * svn
    for m0 in range(start, end, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        live = rm < end
        x_rows = x_ptr + rm[:, None].to(tl.int64) * sxm
        if GATHER:
            tok = tl.load(tok_ptr + rm, mask=live, other=0)
            x_rows = x_ptr + tok[:, None].to(tl.int64) * sxm
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            a = tl.load(x_rows + kk[None, :] * sxk, mask=live[:, None] & (kk[None, :] < K), other=0.0)
            b = tl.load(v_rows + kk[:, None] * svk, mask=(kk[:, None] < K) & (rn[None, :] < R), other=0.0)
            acc += tl.dot(a, b.to(a.dtype))
        tl.store(y_ptr + rm[:, None] * sym + (N + rn[None, :]) * syn, acc.to(y_ptr.dtype.element_ty),
                 mask=live[:, None] & (rn[None, :] < R))


@triton.jit
def moe_combine_kernel(y_ptr, pos_ptr, weight_ptr, out_ptr, N, TOP_K, sym, syn, som, son, BLOCK_N: tl.constexpr):
    t = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for j in range(0, TOP_K):
        p = tl.load(pos_ptr + t * TOP_K + j).to(tl.int64)
        w = tl.load(weight_ptr + t * TOP_K + j).to(tl.float32)
        acc += w * tl.load(y_ptr + p * sym + rn * syn, mask=rn < N, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * som + rn * son, acc.to(out_ptr.dtype.element_ty), mask=rn < N)
