"""Packed rows through variable-length flash attention: every example attends only to itself, and no mask exists.

A packed row holds several examples back to back (:mod:`dsft.data.packing`). With flex attention transformers
builds a block mask per forward from ``position_ids`` (looking at the data: a device sync, and a path that differs
eagerly and under CUDA-graph capture, see :func:`dsft.recipes.graphs.recorded_alike`). Here the examples' lengths
are known on the host when the rows are laid out (:func:`dsft.data.packing.row_lengths`), travel with the batch
as ``seq_lens`` ``[rows, slots]``, become the cumulative offsets flash attention's variable-length kernel takes on
the device in fixed-shape ops (:func:`dsft.data.packing.cu_seqlens`), and reach each attention call as the
``dsft_cu_seqlens`` keyword of the decoder's forward (:func:`dsft.data.packing.model_inputs`). The kernel computes each example's causal attention
and nothing across examples; no mask is built, so every batch records as it runs eagerly.

Measured on an H200 (DeepSeek-V2-Lite's attention, 4 x 2048 packed SFT-like rows, 16 heads, query/key 192 and
value 128 wide, forward + backward of one layer): flex attention over the block mask 1.74 ms, this kernel 1.28
(``benchmarks/results/2026-12-01-h200-train-varlen.md``). Offsets padded at the end with zero-length examples
cost nothing measurable (1.248 vs 1.247 ms for 12 examples in 16 slots), so a shape has one offsets length.

The kernel is PyTorch's (``torch.nn.attention.varlen``, flash attention 2, CUDA only, torch >= 2.9); value heads
narrower than the query's are padded to its width (flash attention takes one head size), and grouped key/value
heads are repeated (torch 2.11's kernel has no ``enable_gqa``). Elsewhere :func:`reference` runs the same math
one example at a time through SDPA: the CPU tests' oracle, and what a CPU process gets if asked for this path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsft.data.packing import CU_KEY, cu_seqlens, row_lengths

VARLEN = "dsft_varlen"
"""The name this attention is registered under in transformers' ``AttentionInterface``."""


def kernel_available() -> bool:
    """PyTorch's variable-length flash attention exists in this torch and a GPU can run it."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def register() -> None:
    """Make ``dsft_varlen`` an attention implementation transformers accepts (idempotent). It has no mask function,
    so transformers builds no mask for it (its ``masking_utils`` skips implementations it has none for)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, attention_forward)


def _offsets_from_positions(position_ids: torch.Tensor | None, rows: int, seq: int, device) -> torch.Tensor:
    """Offsets for a call that brought none: from the positions transformers passes (a device sync), or one
    example per row."""
    if position_ids is None:
        return torch.arange(0, rows * seq + 1, seq, dtype=torch.int32, device=device)
    return cu_seqlens(row_lengths(position_ids.expand(rows, -1)))


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                      **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature (query ``[B, H, S, D]``, key/value ``[B, Hkv, S, D*]``) -> output
    ``[B, S, H, Dv]``. Causal within each example of :data:`CU_KEY`'s offsets; ``attention_mask`` is ignored
    (transformers passes None for this implementation: rows are laid out by dsft's packer, padding at their ends)."""
    if dropout:
        raise ValueError("dsft_varlen attention does not support dropout; set the config's attention_dropout to 0")
    unsupported = [k for k in ("sliding_window", "softcap", "s_aux") if kwargs.get(k) is not None]
    if unsupported:  # never computed silently without them
        raise ValueError(f"dsft_varlen attention does not support {', '.join(unsupported)}; "
                         "train with DSFT_ATTENTION=flex_attention")
    B, H, S, D = query.shape
    Hkv, Dv = key.shape[1], value.shape[-1]
    cu = kwargs.get(CU_KEY)
    if cu is None:
        cu = _offsets_from_positions(kwargs.get("position_ids"), B, S, query.device)
    q = query.transpose(1, 2).reshape(B * S, H, D)
    k = key.transpose(1, 2).reshape(B * S, Hkv, key.shape[-1])
    v = value.transpose(1, 2).reshape(B * S, Hkv, Dv)
    if Hkv != H:  # transformers' repeat_kv order: key head j serves query heads j*g .. j*g+g-1
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
    width = max(D, Dv)
    q, k, v = (F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t for t in (q, k, v))
    scale = scaling if scaling is not None else D ** -0.5
    if q.is_cuda and kernel_available():
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(q, k, v, cu, cu, S, S, scale=scale, window_size=(-1, 0))
    else:
        out = reference(q, k, v, cu, scale)
    return out[..., :Dv].reshape(B, S, H, Dv), None


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, scale: float) -> torch.Tensor:
    """What the kernel computes, one example at a time through SDPA: ``q, k, v`` ``[tokens, H, D]``, causal within
    each ``cu[i]:cu[i + 1]``."""
    out = torch.zeros_like(q[..., : v.shape[-1]])
    bounds = cu.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi > lo:
            part = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1), k[lo:hi].transpose(0, 1),
                                                  v[lo:hi].transpose(0, 1), is_causal=True, scale=scale)
            out[lo:hi] = part.transpose(0, 1)
    return out
