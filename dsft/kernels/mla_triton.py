"""The Triton kernels of DeepSeek-V2's absorbed attention in a decode step (imported by
:mod:`dsft.kernels.mla_attention` only where Triton can run). The math, and the torch code they replace, are in
:mod:`dsft.runtime.mla_decode`.

``mla_prologue_kernel``: program b takes row b's new token from the latent projection ``kv`` (``C`` latent
columns, then ``DR`` rope columns) and its query heads' rope columns, and in one pass writes
``weight * rms_norm(latent)`` (rounded as transformers' RMSNorm rounds: the normalised value in the activations'
dtype, then the weight product) and the rotated key rope columns into the cache at the row's column
``write[b]``, and the rotated query rope columns into ``qpe``. Rotation is DeepSeek's complex form: columns
``(2i, 2i + 1)`` are one complex number, multiplied by ``cos + i sin`` of pair i in fp32.

``mla_attend_kernel``: program (b, head block, span) attends row b's query heads over the span's cached latents,
flash-decoding style: scores ``scaling * (q_lat k_lat^T + q_pe k_rope^T)`` in fp32, a running max and sum over
``BLOCK_W`` cached columns at a time (columns the mask turns off get no weight), and the output ``p k_lat``
accumulated in fp32. The span's latents are read once for all the heads of the block. With one span the program
writes the output; with several (``SPLIT``: few rows over many columns would leave most of the GPU idle), each
writes its running max, sum and unnormalised output, and ``mla_combine_kernel`` (program (b, head)) rescales
and adds them.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def mla_prologue_kernel(q_ptr, kv_ptr, w_ptr, f_ptr, lat_ptr, rope_ptr, write_ptr, qpe_ptr, eps,
                        sqb, sqh, sqd, skb, skd, sfb, sfi, sfc, slb, slw, sld, srb, srw, srd, sob, soh, sod,
                        NH, DN, C, DR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    col = tl.load(write_ptr + b).to(tl.int64)
    # the latent: RMSNorm, then the weight product, each rounded to the activations' dtype
    rc = tl.arange(0, BLOCK_C)
    live = rc < C
    x = tl.load(kv_ptr + b * skb + rc * skd, mask=live, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)
    normed = (x * rstd).to(kv_ptr.dtype.element_ty).to(tl.float32)
    latent = tl.load(w_ptr + rc, mask=live, other=0.0).to(tl.float32) * normed
    tl.store(lat_ptr + b * slb + col * slw + rc * sld, latent.to(lat_ptr.dtype.element_ty), mask=live)
    # the rope columns: pairs (2i, 2i + 1) times cos + i sin of pair i
    ri = tl.arange(0, DR // 2)
    cos = tl.load(f_ptr + b * sfb + ri * sfi)
    sin = tl.load(f_ptr + b * sfb + ri * sfi + sfc)
    k_re = tl.load(kv_ptr + b * skb + (C + 2 * ri) * skd).to(tl.float32)
    k_im = tl.load(kv_ptr + b * skb + (C + 2 * ri + 1) * skd).to(tl.float32)
    rope_row = rope_ptr + b * srb + col * srw
    tl.store(rope_row + 2 * ri * srd, (k_re * cos - k_im * sin).to(rope_ptr.dtype.element_ty))
    tl.store(rope_row + (2 * ri + 1) * srd, (k_re * sin + k_im * cos).to(rope_ptr.dtype.element_ty))
    rh = tl.arange(0, BLOCK_H)
    heads = rh[:, None] < NH
    q_row = q_ptr + b * sqb + rh[:, None] * sqh
    q_re = tl.load(q_row + (DN + 2 * ri[None, :]) * sqd, mask=heads, other=0.0).to(tl.float32)
    q_im = tl.load(q_row + (DN + 2 * ri[None, :] + 1) * sqd, mask=heads, other=0.0).to(tl.float32)
    o_row = qpe_ptr + b * sob + rh[:, None] * soh
    tl.store(o_row + 2 * ri[None, :] * sod, (q_re * cos[None, :] - q_im * sin[None, :]).to(qpe_ptr.dtype.element_ty),
             mask=heads)
    tl.store(o_row + (2 * ri[None, :] + 1) * sod,
             (q_re * sin[None, :] + q_im * cos[None, :]).to(qpe_ptr.dtype.element_ty), mask=heads)


@triton.jit
def mla_attend_kernel(ql_ptr, qp_ptr, lat_ptr, rope_ptr, mask_ptr, out_ptr, part_ptr, ml_ptr, scaling, NH, W, SPAN,
                      sqlh, sqlb, sqlc, sqpb, sqph, sqpd, slb, slw, slc, srb, srw, srd, smb, smw, soh, sob, soc,
                      C: tl.constexpr, DR: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
                      SPLIT: tl.constexpr):
    b = tl.program_id(0)
    rh = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    heads = rh[:, None] < NH
    rc = tl.arange(0, C)
    rd = tl.arange(0, DR)
    q_lat = tl.load(ql_ptr + rh[:, None] * sqlh + b * sqlb + rc[None, :] * sqlc, mask=heads, other=0.0)
    q_pe = tl.load(qp_ptr + b * sqpb + rh[:, None] * sqph + rd[None, :] * sqpd, mask=heads, other=0.0)
    # A finite floor, not -inf: a span whose columns are all masked keeps weight 0 without NaNs (exp(-inf - floor)).
    m_i = tl.full((BLOCK_H,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, C), dtype=tl.float32)
    start = split * SPAN
    end = tl.minimum(W, start + SPAN)
    for w0 in range(start, end, BLOCK_W):
        rw = w0 + tl.arange(0, BLOCK_W)
        live = rw < end
        on = tl.load(mask_ptr + b * smb + rw * smw, mask=live, other=0) != 0
        k_lat = tl.load(lat_ptr + b * slb + rw[:, None] * slw + rc[None, :] * slc, mask=live[:, None], other=0.0)
        k_rope = tl.load(rope_ptr + b * srb + rw[:, None] * srw + rd[None, :] * srd, mask=live[:, None], other=0.0)
        s = tl.dot(q_lat, tl.trans(k_lat)) + tl.dot(q_pe, tl.trans(k_rope))
        s = tl.where((live & on)[None, :], s * scaling, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(k_lat.dtype), k_lat)
        m_i = m_new
    if SPLIT:  # this span's running max, sum and unnormalised output, for mla_combine_kernel
        n_split = tl.num_programs(2)
        at = (b * NH + rh) * n_split + split
        tl.store(ml_ptr + at * 2, m_i, mask=rh < NH)
        tl.store(ml_ptr + at * 2 + 1, l_i, mask=rh < NH)
        tl.store(part_ptr + at[:, None] * C + rc[None, :], acc, mask=heads)
    else:
        out = acc / l_i[:, None]
        tl.store(out_ptr + rh[:, None] * soh + b * sob + rc[None, :] * soc, out.to(out_ptr.dtype.element_ty), mask=heads)


@triton.jit
def mla_combine_kernel(part_ptr, ml_ptr, out_ptr, NH, N_SPLIT, soh, sob, soc,
                       C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    rs = tl.arange(0, BLOCK_S)
    live = rs < N_SPLIT
    at = (b * NH + h) * N_SPLIT + rs
    m = tl.load(ml_ptr + at * 2, mask=live, other=-float("inf"))
    weight = tl.exp(m - tl.max(m, axis=0))
    total = tl.sum(tl.load(ml_ptr + at * 2 + 1, mask=live, other=0.0) * weight, axis=0)
    for c0 in tl.static_range(0, C, BLOCK_C):
        rc = c0 + tl.arange(0, BLOCK_C)
        acc = tl.load(part_ptr + at[:, None] * C + rc[None, :], mask=live[:, None], other=0.0)
        out = tl.sum(acc * weight[:, None], axis=0) / total
        tl.store(out_ptr + h * soh + b * sob + rc * soc, out.to(out_ptr.dtype.element_ty))
