"""The Triton kernels of :mod:`dsft.kernels.router` (imported only where Triton can run).

``router_logits_kernel``: program (i, j) computes the partial logits ``x[:, h] W[e, h]^T`` of experts block i over
hidden block j for every token (at decode sizes all of them fit one tile), in fp32 with IEEE products, into
``partial[j]``: the router weight is spread over many programs instead of streamed by one.

``router_topk_kernel``: program i takes ``BLOCK_T`` tokens: sums the partial logits, stores them, takes the softmax
over the experts, then ``K`` rounds of taking the largest probability left (its expert, and its probability times
``scale``) and striking it out (the lowest expert among ties).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def router_logits_kernel(x_ptr, w_ptr, partial_ptr, T, H, E, SPAN, sxt, sxh, swe, swh,
                         BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    re = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    split = tl.program_id(1)
    experts = re < E
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        tokens = rt < T
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for h0 in range(split * SPAN, tl.minimum(H, split * SPAN + SPAN), BLOCK_H):
            rh = h0 + tl.arange(0, BLOCK_H)
            cols = rh < H
            x = tl.load(x_ptr + rt[:, None] * sxt + rh[None, :] * sxh, mask=tokens[:, None] & cols[None, :], other=0.0)
            w = tl.load(w_ptr + re[None, :] * swe + rh[:, None] * swh, mask=cols[:, None] & experts[None, :], other=0.0)
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        out = partial_ptr + (split * T + rt[:, None]) * E + re[None, :]
        tl.store(out, acc, mask=tokens[:, None] & experts[None, :])


@triton.jit
def router_topk_kernel(partial_ptr, logits_ptr, weights_ptr, index_ptr, T, E, N_SPLIT, scale,
                       K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    rt = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    re = tl.arange(0, BLOCK_E)
    tokens, experts = rt < T, re < E
    keep = tokens[:, None] & experts[None, :]
    logits = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for s in range(0, N_SPLIT):
        logits += tl.load(partial_ptr + (s * T + rt[:, None]) * E + re[None, :], mask=keep, other=0.0)
    tl.store(logits_ptr + rt[:, None] * E + re[None, :], logits, mask=keep)
    logits = tl.where(experts[None, :], logits, -float("inf"))
    p = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    for j in tl.static_range(K):
        best = tl.max(p, axis=1)
        pick = tl.min(tl.where(p == best[:, None], re[None, :], BLOCK_E), axis=1)
        tl.store(weights_ptr + rt * K + j, best * scale, mask=tokens)
        tl.store(index_ptr + rt * K + j, pick.to(tl.int64), mask=tokens)
        p = tl.where(re[None, :] == pick[:, None], -1.0, p)
