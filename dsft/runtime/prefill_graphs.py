"""Prompts prefilled as replayed CUDA graphs: the time to first token without the host's launch work.

A prefill launched op by op costs the host as much as an eager decode step (~55-130 ms on an H200 for
DeepSeek-V2-Lite's 27 layers, whatever the prompt length up to a few thousand tokens); the GPU's own work for 32
short prompts is a few milliseconds. Here a whole-prompt admission runs as a graph captured per bucket of
(rows, width), powers of two: the prompts left-padded to the bucket's width (as :meth:`RunningBatch.admit` pads
them to the longest), the bucket's unused rows all padding. What the graph computes is what the eager prefill
computes on those inputs: the same left-padded layout, positions counted from each row's first token, a causal
mask over each row's own tokens (a padding position attends to itself only, so no row of the mask is empty),
and every position's keys and values, right-aligned, which the rows then join the running batch from
(:meth:`dsft.runtime.static_cache.SlotCache.load`). Only the last position's logits are computed.

The keys and values a graph writes are rewritten at its next replay: the rows get copies (a ``DynamicCache``
built outside the graph, as the eager prefill hands them over). An attach or detach (:attr:`MultiLora.version`) drops the graphs, as
it drops the decode graphs. On by default where decode steps are graphed (``DSFT_PREFILL_GRAPHS=0`` turns it off):
on an H200, FP8 experts, 32 mixed requests, the time to first token fell 0.128 -> 0.058 s and tokens/s rose
3,051 -> 3,446 (``benchmarks/results/2026-12-02-h200-runtime-prefill-graphs.md``).

Memory: a bucket's graph keeps its keys and values (rows x width x layers x the cache's width per token) until it is
dropped; the buckets' graphs alive at once hold at most :data:`MAX_HELD_BYTES` of them (the least recently used
bucket goes first, :func:`to_drop`), and their activations share one pool the size of the largest prefill's.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from dsft.runtime.kv_cache import cache_kwarg
from dsft.runtime.multilora import MultiLora
from dsft.runtime.row_groups import RowGroups
from dsft.runtime.static_cache import bucket, capture, graphs_wanted, group_indices

log = logging.getLogger("dsft.runtime")

MIN_PREFILL_WIDTH = 16
"""The narrowest width bucket of a graphed prefill."""
MAX_GRAPH_TOKENS = 4096
"""Largest bucket (rows x width) prefilled as a graph; larger prefills are long enough that the GPU's work, not
the host's, sets their time, and a graph holds its activations' memory for as long as it lives."""
MAX_HELD_BYTES = 2**30
"""Keys and values the captured buckets hold at once. DeepSeek-V2-Lite keeps ~31 KB a token (27 layers x 576 x 2
bytes): ~34,000 tokens of buckets (every bucket of up to 32 rows would be ~48,000); a model with a wider cache keeps
fewer alive."""


def to_drop(held: Sequence[tuple[Any, int]], need: int, cap: int) -> list[Any]:
    """The keys of ``held`` (oldest use first, each with its bytes) to drop, oldest first, so that ``need`` more bytes
    fit under ``cap``; all of them when ``need`` alone is past it."""
    total, out = sum(n for _, n in held), []
    for key, n in held:
        if total + need <= cap:
            break
        out.append(key)
        total -= n
    return out


def prefill_graphs_wanted(model) -> bool:
    """Graphed prefills where decode steps are graphed (:func:`graphs_wanted`), unless ``DSFT_PREFILL_GRAPHS=0``."""
    return graphs_wanted(model) and os.environ.get("DSFT_PREFILL_GRAPHS", "1") != "0"


class _PromptCache:
    """What transformers' attention layers need of a cache for a prefill from nothing: each layer's keys and values
    kept as they come and handed back (a ``DynamicCache`` starts each layer from an empty tensor made from a
    Python list, which a graph should not hold)."""

    is_compileable = False
    is_sliding = ()

    def __init__(self) -> None:
        self.layers: list[SimpleNamespace] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        assert layer_idx == len(self.layers), "layers are filled in order, once"
        self.layers.append(SimpleNamespace(keys=key_states, values=value_states))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return query_length, 0


@dataclass
class _Bucket:
    """One (rows, width) bucket's static inputs, and what its graph writes."""

    ids: torch.Tensor
    """``[rows, width]`` global token ids, left-padded."""
    real: torch.Tensor
    """``[rows, width]`` bool: True over each row's prompt tokens."""
    groups: torch.Tensor
    """``[rows]`` each row's adapter (index into the adapters' order), -1 for the base."""
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None
    cache: _PromptCache | None = None
    routing: RowGroups | None = None
    stacks: object = None
    """Tensors made in the warm-up that the graph reads (see :class:`dsft.runtime.static_cache._Graph`)."""

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values its graph keeps (none before a capture, or without graphs)."""
        return sum(t.nbytes for layer in self.cache.layers for t in (layer.keys, layer.values)) if self.cache else 0


class PrefillGraphs:
    """Whole-prompt prefills over bucketed inputs: replayed CUDA graphs, or (``graphs=False``) the same inputs
    run eagerly, which is how the CPU tests check what a graph computes.

    Args:
        model: the runtime's model (multi-adapter embedding and head installed).
        lora: the runtime's per-row LoRA (a graph routes over every attached adapter, as decode graphs do).
        pad_id: the id left padding and unused rows are filled with.
        graphs: capture CUDA graphs (default: :func:`prefill_graphs_wanted`).
    """

    def __init__(self, model, lora: MultiLora, pad_id: int, *, graphs: bool | None = None):
        self.model, self.lora, self.pad_id = model, lora, pad_id
        self.device = model.device
        self.graphs_on = prefill_graphs_wanted(model) if graphs is None else graphs
        self._buckets: dict[tuple[int, int], _Bucket] = {}
        self._version: int | None = None
        self._pool = None
        self.captures = 0
        self.prefills = 0
        """Prefills run through a bucket (replayed or, without graphs, eagerly)."""
        self.graph_error: str | None = None

    @staticmethod
    def fits(rows: int, width: int) -> bool:
        """Whether a prefill of ``rows`` prompts padded to ``width`` goes through a bucket."""
        return bucket(rows) * bucket(width, MIN_PREFILL_WIDTH) <= MAX_GRAPH_TOKENS

    def forward(self, ids: torch.Tensor, real: torch.Tensor, keys: Sequence[str | None]) -> tuple[torch.Tensor, Any]:
        """The last position's logits ``[n, V]`` and the keys/values (a ``DynamicCache`` of the bucket's width, the
        first ``n`` rows) of prompts ``ids`` ``[n, W]`` (global ids, left-padded; ``real``: their mask) through
        adapters ``keys``. The cache holds copies of the first ``n`` rows (the graph's own buffers are rewritten by
        the next prefill of the bucket)."""
        from transformers import DynamicCache

        n, width = ids.shape
        b = self._bucket(bucket(n), bucket(width, MIN_PREFILL_WIDTH))
        cols = b.ids.shape[1]
        b.ids.fill_(self.pad_id)
        b.ids[:n, cols - width:] = ids
        b.real.zero_()
        b.real[:n, cols - width:] = real.bool()
        b.groups.copy_(group_indices(self.lora.keys(), keys, b.ids.shape[0]), non_blocking=True)
        if self.graphs_on and b.graph is None:
            try:
                self._capture(b)
            except Exception as exc:  # an op that syncs with the host, or a capture limit: prefill eagerly
                log.warning("prefills run without CUDA graphs: capturing one failed (%s: %s)", type(exc).__name__, str(exc)[:300])
                self.graphs_on, self.graph_error = False, f"{type(exc).__name__}: {str(exc)[:300]}"
                self._buckets.clear()
        if self.graphs_on:
            assert b.graph is not None and b.logits is not None
            b.graph.replay()
            logits, cache = b.logits, b.cache
            assert cache is not None
        else:
            logits, cache = self._step(b, self._routing(b))
        self.prefills += 1
        rows = DynamicCache(config=self.model.config)
        for i, layer in enumerate(cache.layers):
            rows.update(layer.keys[:n], layer.values[:n], i)
        return logits[:n], rows

    def _bucket(self, rows: int, width: int) -> _Bucket:
        if self._version != self.lora.version:  # the adapters' stacked factors changed: graphs are stale
            self._buckets.clear()
            self._version, self._pool = self.lora.version, None
        hit = self._buckets.pop((rows, width), None)  # popped and put back: the dict's order is least recent first
        if hit is None:
            per_token = next((b.nbytes / (r * w) for (r, w), b in self._buckets.items() if b.nbytes), 0.0)
            held = [(key, b.nbytes) for key, b in self._buckets.items()]
            for key in to_drop(held, int(per_token * rows * width), MAX_HELD_BYTES):
                del self._buckets[key]  # its graph and tensors go; the pool reuses their blocks
            hit = _Bucket(
                torch.full((rows, width), self.pad_id, dtype=torch.long, device=self.device),
                torch.zeros((rows, width), dtype=torch.bool, device=self.device),
                torch.full((rows,), -1, dtype=torch.long, device=self.device))
        self._buckets[(rows, width)] = hit
        return hit

    def held_bytes(self) -> int:
        """Keys and values the buckets' graphs keep now."""
        return sum(b.nbytes for b in self._buckets.values())

    def _routing(self, b: _Bucket) -> RowGroups:
        return RowGroups(b.ids.shape[0], self.lora.keys(), b.groups, None)

    def _step(self, b: _Bucket, groups: RowGroups) -> tuple[torch.Tensor, _PromptCache]:
        width = b.ids.shape[1]
        positions = (b.real.long().cumsum(-1) - 1).clamp(min=0)
        col = torch.arange(width, device=self.device)
        causal = col[None, :] <= col[:, None]                                    # [query, key]
        mask = (causal[None] & b.real[:, None, :]) | (col[None, :] == col[:, None])[None]  # a pad sees itself only
        cache = _PromptCache()
        with torch.inference_mode(), self.lora.rows(groups):
            out = self.model(input_ids=b.ids, attention_mask=mask[:, None], position_ids=positions,
                             **cache_kwarg(self.model, cache), use_cache=True, logits_to_keep=1)
        return out.logits[:, -1], cache

    def _capture(self, b: _Bucket) -> None:
        groups = self._routing(b)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        b.graph, (b.logits, b.cache), b.stacks = capture(lambda: self._step(b, groups), groups, self.lora, self.device,
                                                         self._pool)
        b.routing = groups
        self.captures += 1
