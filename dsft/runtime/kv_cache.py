"""Joining, slicing and trimming transformers' ``DynamicCache`` for continuous batching.

transformers grows a ``DynamicCache`` for one batch that starts together; it has ``batch_select_indices``
to drop rows but nothing to add rows that were prefilled separately. Continuous batching needs exactly
that: new requests are prefilled on their own (their prompts left-padded among themselves) and then
join the running rows. Every row is kept aligned at the right (left padding along the time axis), so the
next token of every row is written at the same cache index; the attention mask (zeros over the padding)
and explicit per-row position ids keep each row computing exactly what it computes alone.

Only plain full-attention layers (``DynamicLayer``: ``keys``/``values`` ``[batch, heads, time, dim]``) can be
joined this way: the architectures dsft serves use them (DeepSeek-V2/V3 cache MLA's compressed latent as a
one-head layer, Qwen2-MoE, Qwen3-MoE, Mixtral and OLMoE full attention). A sliding-window layer crops its
own history, so a cache with one is not joinable (:func:`joinable`); the engine then admits requests only
into an empty batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def joinable(cache) -> bool:
    """Whether :func:`join` can merge caches of this kind (every layer a plain ``DynamicLayer``)."""
    from transformers.cache_utils import DynamicLayer

    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def _left_pad_time(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` ``[B, H, T, D]`` padded with zeros on the left of the time axis to ``width`` (masked out anyway)."""
    missing = width - t.shape[-2]
    return t if missing == 0 else F.pad(t, (0, 0, missing, 0))


def join(running, new) -> None:
    """Append the rows of cache ``new`` after the rows of ``running`` (in place on ``running``), both
    right-aligned: the shorter one is left-padded along time. ``new`` is consumed."""
    for mine, theirs in zip(running.layers, new.layers, strict=True):
        if not theirs.is_initialized:
            continue
        if not mine.is_initialized or mine.keys.numel() == 0:
            mine.lazy_initialization(theirs.keys, theirs.values)
            mine.keys, mine.values = theirs.keys, theirs.values
            continue
        width = max(mine.keys.shape[-2], theirs.keys.shape[-2])
        mine.keys = torch.cat([_left_pad_time(mine.keys, width), _left_pad_time(theirs.keys, width)], dim=0)
        mine.values = torch.cat([_left_pad_time(mine.values, width), _left_pad_time(theirs.values, width)], dim=0)


def select(cache, rows: torch.Tensor) -> None:
    """Keep only ``rows`` (indices along the batch) of every layer, in place."""
    cache.batch_select_indices(rows)


def trim_left(cache, columns: int) -> None:
    """Drop the first ``columns`` time steps of every layer, in place: columns that are padding for every
    remaining row (after the longest rows left), so the cache is as wide as its longest row needs."""
    if columns <= 0:
        return
    for layer in cache.layers:
        if layer.is_initialized and layer.keys.numel():
            layer.keys = layer.keys[..., columns:, :]
            layer.values = layer.values[..., columns:, :]


def join_masks(running: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """Attention masks ``[B, T]`` joined like :func:`join` (left-padded with zeros to the wider one)."""
    if running is None or running.shape[0] == 0:
        return new
    width = max(running.shape[1], new.shape[1])
    return torch.cat([F.pad(running, (width - running.shape[1], 0)), F.pad(new, (width - new.shape[1], 0))], dim=0)
