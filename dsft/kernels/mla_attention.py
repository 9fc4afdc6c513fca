"""DeepSeek-V2's absorbed decode attention in two Triton kernels instead of about thirty small torch ops.

A decode step of the runtime is a few thousand tiny kernels, and on an H200 each costs ~2-3 us whatever it does
(``benchmarks/decode_profile.py``). Per layer, the absorbed attention of :mod:`dsft.runtime.mla_decode` spent ~30
of them between its projections: the latent's RMSNorm (2), DeepSeek's complex rotary on the query and key rope
columns (~14: casts, complex views, products), the cache writes (4), and scale, mask, softmax and casts around
the two score GEMMs and the output GEMM (8). Here they are two:

* :func:`prologue`: the latent normalised and the key rope columns rotated, both written into the row's cache
  column, and the query rope columns rotated (one program per row);
* :func:`attend`: each row's heads over its cached latents, flash-decoding style (scores, masked online
  softmax and the weighted sum of latents in one pass; one program per row, block of 16 heads and span of
  columns, and one more kernel adding the spans up when there are several).

:func:`prologue_reference` and :func:`attend_reference` are the torch ops they replace (the runtime's own path
off a GPU, and the CPU tests' oracle: the kernels run there in Triton's interpreter).
"""
from __future__ import annotations

import os

import torch

from dsft.kernels import moe_gemm

HEADS_PER_PROGRAM = 16
"""Query heads one ``attend`` program holds (tl.dot needs 16 rows; DeepSeek-V2-Lite has 16 heads, V2 128)."""


def _kernels():
    moe_gemm.require("MLA kernels")
    from dsft.kernels import mla_triton

    return mla_triton


def _pow2(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


def usable(x: torch.Tensor, latent: int, rope: int, cache_dtype: torch.dtype) -> bool:
    """Whether the kernels should (and can) run: Triton present (see :func:`dsft.kernels.moe_gemm.available`), CUDA in
    half precision (or the interpreter), latent and rope widths powers of two of at least 16 (DeepSeek-V2: 512 and
    64), the cache in the activations' dtype, unless ``DSFT_TRITON_MLA=0`` (to compare with the torch ops)."""
    return (moe_gemm.runs_on(x) and _pow2(latent) and _pow2(rope) and cache_dtype == x.dtype
            and os.environ.get("DSFT_TRITON_MLA", "1") != "0")


def prologue(q: torch.Tensor, kv: torch.Tensor, weight: torch.Tensor, eps: float, freqs: torch.Tensor,
             lat: torch.Tensor, rope: torch.Tensor, write: torch.Tensor, nope: int) -> torch.Tensor:
    """Row b's new token: ``lat[b, write[b]] = weight * rms_norm(kv[b, :C])``, ``rope[b, write[b]] =`` the rotated
    ``kv[b, C:]``; returns the rotated query rope columns ``q[:, :, nope:]`` [b, heads, DR] (new tensor).

    ``q`` [b, heads, nope + DR], ``kv`` [b, C + DR] (any strides), ``freqs`` [b, DR / 2, 2] fp32 (cos, sin: the
    real view of DeepSeek's complex ``freqs_cis``), ``lat`` [slots, columns, C], ``rope`` [slots, columns, DR],
    ``write`` [b] the column each row writes."""
    b, nh, _ = q.shape
    C, DR = lat.shape[-1], rope.shape[-1]
    qpe = q.new_empty((b, nh, DR))
    _kernels().mla_prologue_kernel[(b,)](
        q, kv, weight, freqs, lat, rope, write, qpe, eps, q.stride(0), q.stride(1), q.stride(2), kv.stride(0),
        kv.stride(1), freqs.stride(0), freqs.stride(1), freqs.stride(2), lat.stride(0), lat.stride(1), lat.stride(2),
        rope.stride(0), rope.stride(1), rope.stride(2), qpe.stride(0), qpe.stride(1), qpe.stride(2), nh, nope, C,
        DR=DR, BLOCK_H=max(16, 1 << (nh - 1).bit_length()), BLOCK_C=1 << (C - 1).bit_length())
    return qpe


SPAN = 32
"""Cached columns a program of :func:`attend` takes at least (one ``BLOCK_W`` block)."""
PROGRAMS = 264
"""Programs :func:`attend` aims for (two per SM of an H200) by splitting rows' columns into spans, when rows x head
blocks are fewer: one program per row streamed a 1,024-column row's 1.2 MB of latents alone."""


def spans(rows: int, head_blocks: int, width: int) -> int:
    """Column spans per (row, head block): enough programs to fill the GPU, at least :data:`SPAN` columns each."""
    return max(1, min(_cdiv(width, SPAN), _cdiv(PROGRAMS, rows * head_blocks)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def attend(q_lat: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor,
           scaling: float) -> torch.Tensor:
    """``softmax(scaling * (q_lat k_lat^T + q_pe k_rope^T)) k_lat`` per row and head -> [heads, b, C].

    ``q_lat`` [heads, b, C], ``q_pe`` [b, heads, DR], ``lat`` [b, W, C], ``rope`` [b, W, DR] (the rows' cached
    columns, any strides), ``mask`` [b, W] bool (a column a row may attend to; column 0 always)."""
    nh, b, C = q_lat.shape
    W, DR = lat.shape[1], rope.shape[-1]
    out = q_lat.new_empty((nh, b, C))
    flags = mask.view(torch.uint8)
    head_blocks = _cdiv(nh, HEADS_PER_PROGRAM)
    span = _cdiv(_cdiv(W, spans(b, head_blocks, W)), SPAN) * SPAN  # columns per span, whole blocks
    n_split = _cdiv(W, span)
    part = q_lat.new_empty((b, nh, n_split, C), dtype=torch.float32) if n_split > 1 else out
    ml = q_lat.new_empty((b, nh, n_split, 2), dtype=torch.float32) if n_split > 1 else out
    kernels = _kernels()
    kernels.mla_attend_kernel[(b, head_blocks, n_split)](
        q_lat, q_pe, lat, rope, flags, out, part, ml, scaling, nh, W, span, q_lat.stride(0), q_lat.stride(1),
        q_lat.stride(2), q_pe.stride(0), q_pe.stride(1), q_pe.stride(2), lat.stride(0), lat.stride(1), lat.stride(2),
        rope.stride(0), rope.stride(1), rope.stride(2), flags.stride(0), flags.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        C=C, DR=DR, BLOCK_H=HEADS_PER_PROGRAM, BLOCK_W=SPAN, SPLIT=n_split > 1, num_warps=8)
    if n_split > 1:
        kernels.mla_combine_kernel[(b, nh)](part, ml, out, nh, n_split, out.stride(0), out.stride(1), out.stride(2),
                                            C=C, BLOCK_S=max(2, 1 << (n_split - 1).bit_length()), BLOCK_C=min(C, 128))
    return out


# --- the torch ops the kernels replace --------------------------------------------------------------------


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """DeepSeek's rotary: pairs of ``x``'s last dimension as complex numbers times ``cos + i sin`` (``freqs`` [..., DR
    / 2, 2], broadcast over x's leading dimensions), in fp32, rounded back to x's dtype."""
    xc = torch.view_as_complex(x.float().contiguous().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * torch.view_as_complex(freqs.contiguous())).flatten(-2).to(x.dtype)


def prologue_reference(q: torch.Tensor, kv: torch.Tensor, weight: torch.Tensor, eps: float, freqs: torch.Tensor,
                       lat: torch.Tensor, rope: torch.Tensor, write: torch.Tensor, nope: int) -> torch.Tensor:
    """:func:`prologue` in torch ops."""
    b, C = q.shape[0], lat.shape[-1]
    latent = kv[:, :C]
    normed = torch.nn.functional.rms_norm(latent, (C,), None, eps)
    rows = torch.arange(b, device=write.device)
    lat[rows, write] = (weight * normed).to(lat.dtype)
    rope[rows, write] = rotate(kv[:, C:], freqs).to(rope.dtype)
    return rotate(q[:, :, nope:], freqs[:, None])


def attend_reference(q_lat: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, rope: torch.Tensor,
                     mask: torch.Tensor, scaling: float) -> torch.Tensor:
    """:func:`attend` in torch ops (scores and softmax in fp32, the weights rounded to the latents' dtype)."""
    scores = (torch.bmm(q_lat.transpose(0, 1).float(), lat.float().transpose(1, 2))
              + torch.bmm(q_pe.float(), rope.float().transpose(1, 2))) * scaling  # [b, heads, W]
    probs = torch.softmax(scores.masked_fill(~mask[:, None, :], float("-inf")), dim=-1).to(lat.dtype)
    return torch.bmm(probs, lat).transpose(0, 1)
