"""What continuous batching needs of transformers' ``DynamicCache``: whether a model's cache can live in slots,
and slicing / trimming the caches that stay dynamic.

Running rows live in :class:`dsft.runtime.static_cache.SlotCache` (one slot per row, left-aligned) whenever
every layer of the model's cache is a plain full-attention ``DynamicLayer`` (``keys``/``values``
``[batch, heads, time, dim]``): the architectures dsft serves use them (DeepSeek-V2/V3 cache MLA's
compressed latent as a one-head layer, Qwen2-MoE, Qwen3-MoE, Mixtral and OLMoE full attention). Rows being
prefilled stay in a ``DynamicCache`` until they join, and so do the running rows of a model with a
sliding-window layer (:func:`joinable` is False: such a layer crops its own history), which then admits
requests only into an empty batch.
"""
from __future__ import annotations

import functools
import inspect

import torch


def joinable(cache) -> bool:
    """Whether rows prefilled in a cache of this kind can join running rows (every layer a plain ``DynamicLayer``)."""
    from transformers.cache_utils import DynamicLayer

    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


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


def cache_kwarg(model, cache) -> dict:
    """``cache`` as the keyword ``model``'s forward takes it: transformers renamed ``past_key_values`` to ``cache``
    (5.24 takes both and warns on the old name, which goes in 5.40; 5.17 has only the old one)."""
    return {_cache_name(type(model)): cache}


@functools.cache
def _cache_name(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"
