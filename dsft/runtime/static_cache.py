"""A pre-allocated KV cache with one slot per running row, and decode steps replayed as CUDA graphs.

Decoding one token is a few thousand small kernels for an MoE model; launched one by one from Python the
host is the bottleneck (on an H200, DeepSeek-V2-Lite shape, one row: 126 ms a step launched eagerly, 10.5 ms
replayed, for 9.4 ms of kernels). A CUDA graph replays the whole step with one launch, but only over tensors
that stay where they were when it was captured. So the running rows' keys and values live in
:class:`SlotCache`: per layer one buffer ``[slots, heads, columns, dim]``, sized when rows join for every
running row's final length (reallocated only when a joining row needs more), row i of the batch in slot i,
its tokens at columns ``[0, length_i)`` (left-aligned). A decode step writes each
row's new key at its own column (its position) and attends over columns ``[0, width)`` with a mask that
is true up to that column: a row computes what it computes alone, whatever the other rows' lengths.

:class:`SlotDecoder` runs the step, eagerly or (on CUDA) as a graph captured per bucket of (rows,
width): powers of two, the unused rows of a bucket fed a pad token in free slots. Rows join by copying
their prefilled cache into free slots (:meth:`SlotCache.load`) and leave by compaction
(:meth:`SlotCache.keep`), so the live rows stay in slots ``[0, n)``.

What a graph captures must not move: the adapters' stacked factors (the mix of every attached adapter),
the row groups' column layouts made in its warm-up (both kept alive with the graph: each capture empties the
allocator's cache), the term tables and the cache buffers. Any change of those (an attach or detach: the
:attr:`dsft.runtime.multilora.MultiLora.version`; the buffers reallocated) drops the graphs, and the next step
captures again. Graphs need half precision (:func:`graphs_wanted`).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dsft.runtime.kv_cache import cache_kwarg
from dsft.runtime.multilora import MultiLora
from dsft.runtime.row_groups import RowGroups

log = logging.getLogger("dsft.runtime")

MIN_WIDTH = 64
"""The narrowest width bucket (columns attended in a decode step)."""


def bucket(n: int, least: int = 1) -> int:
    """The smallest power of two >= max(n, least)."""
    n = max(n, least)
    return 1 << (n - 1).bit_length()


class SlotCache:
    """Per-layer key/value buffers ``[slots, heads, columns, dim]``, a row per slot, left-aligned.

    transformers' attention layers call :meth:`update` with the new token's keys and values (for MLA, the
    compressed latent as a one-head layer) and attend over what it returns. Before a forward the decoder
    sets :attr:`write` (the column each row writes, its position) and :attr:`width` (the columns returned).
    """

    is_compileable = False
    is_sliding = ()

    def __init__(self, slots: int = 1, columns: int = MIN_WIDTH):
        self.slots, self.columns = slots, columns
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.write: torch.Tensor | None = None
        self.width = 0
        self.generation = 0
        """Bumped when the buffers are reallocated (graphs captured on the old ones are stale)."""

    @property
    def allocated(self) -> bool:
        return bool(self.keys)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def allocate_like(self, layers) -> None:
        """Buffers shaped like the layers of a prefilled ``DynamicCache`` (heads, dim, dtype, device per layer)."""
        self.keys = [layer.keys.new_zeros((self.slots, layer.keys.shape[1], self.columns, layer.keys.shape[3]))
                     for layer in layers]
        self.values = [layer.values.new_zeros((self.slots, layer.values.shape[1], self.columns, layer.values.shape[3]))
                       for layer in layers]
        self.generation += 1

    def reserve(self, slots: int, columns: int, live: int) -> None:
        """At least ``slots`` slots and ``columns`` columns, keeping the first ``live`` slots' contents. When it
        must grow, it is reallocated at exactly what is asked (rounded up to powers of two), which may be less
        than it had along the other dimension: the cache follows the rows running now, so what a KV budget
        admitted is what it holds (the caller asks for every live row's final length)."""
        if slots <= self.slots and columns <= self.columns:
            return
        old_columns = self.columns
        self.slots, self.columns = bucket(slots), bucket(columns, MIN_WIDTH)
        if not self.allocated:
            return
        keep = min(old_columns, self.columns)
        for buffers in (self.keys, self.values):
            for i, old in enumerate(buffers):  # one layer at a time: the old buffer goes as the new one comes
                new = old.new_zeros((self.slots, old.shape[1], self.columns, old.shape[3]))
                new[:live, :, :keep] = old[:live, :, :keep]
                buffers[i] = new
        self.generation += 1

    def load(self, first: int, layers, lengths: Sequence[int]) -> None:
        """Copy the rows of a prefilled ``DynamicCache`` (row i right-aligned: its last ``lengths[i]`` columns) to
        slots ``first + i``, columns ``[0, lengths[i])``. One gather and one write per buffer for all the rows: a
        copy per row and buffer was ~1,700 launches for 32 rows joining DeepSeek-V2-Lite's 27 layers."""
        if not lengths:
            return
        width = layers[0].keys.shape[2]
        n = torch.tensor(list(lengths))
        row = torch.repeat_interleave(torch.arange(len(lengths)), n)
        col = torch.arange(int(n.sum())) - torch.repeat_interleave(n.cumsum(0) - n, n)  # 0..length-1 within each row
        row, slot, col, src = (t.to(self.keys[0].device) for t in (row, first + row, col, col + width - n[row]))
        for k, v, layer in zip(self.keys, self.values, layers, strict=True):
            k[slot, :, col] = layer.keys[row, :, src]
            v[slot, :, col] = layer.values[row, :, src]

    def keep(self, rows: Sequence[int]) -> None:
        """Move slots ``rows`` (increasing) to ``[0, len(rows))``: the rows that stay, compacted in order."""
        if list(rows) == list(range(len(rows))):
            return
        index = torch.tensor(list(rows), device=self.keys[0].device)
        for buffers in (self.keys, self.values):
            for t in buffers:
                t[: len(rows)] = t.index_select(0, index)

    # --- what transformers' attention layers call ---------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        assert self.write is not None and key_states.shape[2] == 1, "SlotCache takes one token per row"
        b = key_states.shape[0]
        k, v = self.keys[layer_idx], self.values[layer_idx]
        at = self.write.view(b, 1, 1, 1)
        k[:b].scatter_(2, at.expand(b, k.shape[1], 1, k.shape[3]), key_states.to(k.dtype))
        v[:b].scatter_(2, at.expand(b, v.shape[1], 1, v.shape[3]), value_states.to(v.dtype))
        return k[:b, :, : self.width], v[:b, :, : self.width]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.width

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.width, 0


@dataclass
class _Graph:
    """One bucket's graph and the tensors it reads and writes (filled before each replay)."""

    graph: torch.cuda.CUDAGraph | None
    ids: torch.Tensor
    write: torch.Tensor
    groups: torch.Tensor
    logits: torch.Tensor | None
    routing: RowGroups | None = None
    stacks: object = None
    """The row groups captured with and the adapters' stacked factors: tensors made in the warm-up that the
    graph reads (column layouts, factors). Kept alive with the graph: each capture empties the allocator's
    cache, so a freed tensor's memory would go back to the driver and a replay would read unmapped memory."""


def group_indices(order: Sequence[str], keys: Sequence[str | None], rows: int) -> torch.Tensor:
    """A graph bucket's row groups: each row's adapter as an index into ``order`` (every attached adapter), -1 for
    the base and for the bucket's unused rows (``rows`` in all)."""
    index = {k: i for i, k in enumerate(order)}
    return torch.tensor([index.get(k, -1) if k is not None else -1 for k in keys] + [-1] * (rows - len(keys)))


def capture(step, groups: RowGroups, lora: MultiLora, device, pool):
    """Run ``step()`` once on a side stream (cuBLAS workspaces, the adapters' stacked factors, the column
    structures), then capture it into a CUDA graph in ``pool``. Returns (graph, what the captured ``step`` returned,
    the stacked factors the graph reads: keep them alive with it)."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        step()
        groups.drop_masks()  # recomputed from the row groups inside the graph, at every replay
        stacks = lora.current_stacks(groups.keys)
        graph = torch.cuda.CUDAGraph()
        # thread_local: the engine's worker captures while other threads may use CUDA (attach waits for the lock)
        with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            out = step()
    torch.cuda.current_stream(device).wait_stream(stream)
    return graph, out, stacks


def is_slot_decode(cache, seq_len: int) -> bool:
    """Whether an attention forward is a decode step over a :class:`SlotCache` (what the absorbed MLA path of
    :mod:`dsft.runtime.mla_decode` serves)."""
    return isinstance(cache, SlotCache) and seq_len == 1 and cache.write is not None


def graphs_wanted(model) -> bool:
    """CUDA graphs for a model on a CUDA device in bf16 or fp16, unless ``DSFT_CUDA_GRAPHS=0`` (to compare, or to
    debug a step eagerly). In fp32 the routed experts run a per-expert loop that reads the group sizes on the
    host (``torch._grouped_mm`` is half-precision only), which a graph cannot capture."""
    return (model.device.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16)
            and os.environ.get("DSFT_CUDA_GRAPHS", "1") != "0")


class SlotDecoder:
    """Decode steps over a :class:`SlotCache`: eager, or replayed CUDA graphs per (rows, width) bucket.

    Args:
        model: the runtime's model (multi-adapter embedding and head installed).
        lora: the runtime's per-row LoRA; a graph stacks every attached adapter's factors (a row's mask
            picks its own), so the adapters' mix in the batch does not change the graph.
        pad_id: fed to the bucket's unused rows.
        graphs: capture CUDA graphs (default: :func:`graphs_wanted`).
        buckets: pad rows and width to the graphs' buckets even without graphs (default: with graphs): the
            graphs' inputs run eagerly, which is how the CPU tests check what a graph computes.
    """

    def __init__(self, model, lora: MultiLora, pad_id: int, *, graphs: bool | None = None, buckets: bool | None = None):
        self.model, self.lora, self.pad_id = model, lora, pad_id
        self.device = model.device
        self.cache = SlotCache()
        self.graphs_on = graphs_wanted(model) if graphs is None else graphs
        self.buckets = self.graphs_on or bool(buckets)
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._graph_key: tuple | None = None
        self._pool = None
        self.captures = 0
        self.graph_error: str | None = None
        """Why graphs were turned off (a failed capture), if they were."""

    def forward(self, ids: torch.Tensor, write: Sequence[int], keys: Sequence[str | None],
                groups: RowGroups) -> torch.Tensor:
        """Logits ``[n, V]`` of the next token for rows in slots ``[0, n)``: row i is fed ``ids[i]`` (global id)
        at position/column ``write[i]`` (its length so far), through adapter ``keys[i]`` (``groups``: the
        same as row groups, used by the eager step; a graph routes over every attached adapter)."""
        n = len(write)
        width = max(write) + 1
        if not self.buckets:
            self.cache.reserve(n, width, n)
            return self._step(ids.view(n, 1), torch.tensor(list(write), device=self.device), width, groups)
        rows, width = bucket(n), bucket(width, MIN_WIDTH)
        self.cache.reserve(rows, width, n)
        graph = self._inputs(rows, width)
        order = self.lora.keys()
        graph.ids[:n, 0] = ids
        graph.ids[n:] = self.pad_id
        graph.write.copy_(torch.tensor(list(write) + [0] * (rows - n)), non_blocking=True)
        graph.groups.copy_(group_indices(order, keys, rows), non_blocking=True)
        if self.graphs_on and graph.graph is None:
            try:
                self._capture(graph, width)
            except Exception as exc:  # an op that syncs with the host, or a capture limit: decode eagerly
                log.warning("decode steps run without CUDA graphs: capturing one failed (%s: %s)",
                            type(exc).__name__, str(exc)[:300])
                self.graphs_on, self.graph_error = False, f"{type(exc).__name__}: {str(exc)[:300]}"
                self._graphs.clear()
        if not self.graphs_on:  # the graph's inputs, run eagerly
            return self._step(graph.ids, graph.write, width, RowGroups(rows, order, graph.groups, None))[:n]
        assert graph.graph is not None and graph.logits is not None
        graph.graph.replay()
        return graph.logits[:n]

    def _step(self, ids: torch.Tensor, write: torch.Tensor, width: int, groups: RowGroups) -> torch.Tensor:
        cache = self.cache
        cache.write, cache.width = write, width
        mask = (torch.arange(width, device=write.device)[None, :] <= write[:, None])[:, None, None, :]
        with torch.inference_mode(), self.lora.rows(groups):
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=write[:, None], **cache_kwarg(self.model, cache),
                             use_cache=True)
        return out.logits[:, -1]

    def _inputs(self, rows: int, width: int) -> _Graph:
        """The static inputs of the (rows, width) bucket's graph (not captured yet when new)."""
        stale = (self.lora.version, self.cache.generation)
        if stale != self._graph_key:
            self._graphs.clear()
            self._graph_key, self._pool = stale, None
        hit = self._graphs.get((rows, width))
        if hit is None:
            hit = self._graphs[(rows, width)] = _Graph(
                None, torch.full((rows, 1), self.pad_id, dtype=torch.long, device=self.device),
                torch.zeros(rows, dtype=torch.long, device=self.device),
                torch.full((rows,), -1, dtype=torch.long, device=self.device), None)
        return hit

    def _capture(self, graph: _Graph, width: int) -> None:
        """Capture the step over ``graph``'s inputs, which hold the real step's values: the warm-up run and the
        capture write exactly what the replay that follows writes (each row's own key at its own column; the
        bucket's unused rows into free slots), so nothing live is disturbed."""
        groups = RowGroups(graph.ids.shape[0], self.lora.keys(), graph.groups, None)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph.graph, graph.logits, graph.stacks = capture(lambda: self._step(graph.ids, graph.write, width, groups),
                                                          groups, self.lora, self.device, self._pool)
        graph.routing = groups
        self.captures += 1
