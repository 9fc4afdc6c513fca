"""Continuous batching: rows join and leave one running batch at token boundaries.

A :class:`RunningBatch` holds the rows being generated and their KV cache.

* :meth:`RunningBatch.admit` prefills new rows on their own (left-padded among themselves, in a
  transformers ``DynamicCache``), samples their first token, and copies their keys and values into free
  slots of the running rows' :class:`dsft.runtime.static_cache.SlotCache`.
* :meth:`RunningBatch.step` feeds every running row its latest token through
  :class:`dsft.runtime.static_cache.SlotDecoder` (a replayed CUDA graph on a GPU), samples the next one,
  and drops the rows that finished (stop, length, cancelled, failed) at once (the slots are compacted),
  so their slots are free for the next admission.

Overlap (on a GPU): a step launches the next token's forward and sampling *before* reading the tokens the
previous step sampled (they come back through pinned memory with an event), so the host's work of a token
(recording it, detokenising, stop strings, the engine's bookkeeping) runs while the GPU computes the next
one instead of between them. The host learns a row finished one step late: a row that ended by EOS or a
stop string has one more token computed, which is discarded (a row ending by length is foreseen, and a
step whose every row ends is not launched).

In the slots each row is left-aligned and attends over its own columns only, at its own positions, so a
row computes what it would compute alone whatever joins or leaves around it. A model whose cache cannot
be kept that way (sliding-window layers: :func:`dsft.runtime.kv_cache.joinable`) decodes its rows in their
``DynamicCache`` instead and admits new rows only into an empty batch. Each row decodes
through its own adapter: per-row LoRA groups (:class:`dsft.runtime.multilora.RowGroups`) and term
vocabularies (:class:`dsft.adapters.terms.TermTable`) are recomputed whenever the rows or the attached
adapters change. Sampled rows draw from their own generators only (:func:`dsft.runtime.generation.start`),
so a seeded row gives the same tokens whatever shares its batch.

The batch takes no lock: :meth:`dsft.runtime.base.RuntimeBase.step` holds the runtime's lock for one
admission and one step, so adapters can be attached and detached between steps.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dsft.adapters.terms import TermTable
from dsft.runtime import kv_cache
from dsft.runtime.generation import FINISH_LENGTH, Row, advance, fail, left_pad, sample, start
from dsft.runtime.multilora import MultiLora
from dsft.runtime.prefill_graphs import PrefillGraphs, prefill_graphs_wanted
from dsft.runtime.row_groups import RowGroups
from dsft.runtime.static_cache import MIN_WIDTH, SlotDecoder, bucket


@dataclass
class _Part:
    """Rows sharing one cache, and what the next step feeds them (all aligned with ``rows``)."""

    rows: list[Row]
    cache: Any
    """A ``DynamicCache`` (rows being prefilled; running rows of a model without slots), else None: the
    running rows are in the batch's :class:`SlotCache`, row i in slot i."""
    mask: torch.Tensor | None
    """``[B, T]`` with a ``DynamicCache``: 1 over each row's tokens in the cache (right-aligned), 0 over its left padding."""
    positions: torch.Tensor | None
    """``[B, 1]`` with a ``DynamicCache``: the position of the token each row is fed next."""
    lengths: list[int]
    """Each row's tokens in the cache (on the host: trimming and slot writes need no device sync)."""
    last: torch.Tensor | None = None
    """``[B]``: each row's latest sampled token (local ids), fed at the next step."""

    @property
    def keys(self) -> list[str | None]:
        return [r.key for r in self.rows]


@dataclass
class _Unread:
    """Tokens a decode step sampled, on their way to the host: read (and recorded) after the next step is
    launched. ``rows`` are the rows they belong to, in order; rows that finished meanwhile are skipped."""

    rows: list[Row]
    tokens: torch.Tensor
    ready: torch.cuda.Event | None

    @classmethod
    def of(cls, rows: list[Row], local: torch.Tensor) -> _Unread:
        if local.device.type != "cuda":
            return cls(list(rows), local, None)
        host = torch.empty(local.shape, dtype=local.dtype, pin_memory=True)
        host.copy_(local, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(list(rows), host, ready)

    def read(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.tolist()


@dataclass
class _Index:
    """From global logits to each row's local logits (:meth:`TermTable.local_index`), and each row's width."""

    gather: torch.Tensor
    widths: list[int]


@dataclass
class _Fill:
    """New rows whose prompts are being prefilled, a chunk per step; ``part`` holds their cache so far."""

    part: _Part
    ids: torch.Tensor
    """``[b, W]`` the prompts in global ids, left-padded."""
    mask: torch.Tensor
    positions: torch.Tensor
    done: int = 0
    """Columns prefilled so far."""
    fresh: bool = False
    """Admitted during this step (it had its chunk)."""

    def select(self, keep: list[int]) -> None:
        sel = torch.tensor(keep, device=self.ids.device)
        self.ids, self.mask, self.positions = self.ids[sel], self.mask[sel], self.positions[sel]


class RunningBatch:
    """Rows decoding together on one model, joining (:meth:`admit`) and leaving (:meth:`step`) between tokens.

    Args:
        model: the runtime's model (its embedding and head are the runtime's multi-adapter ones).
        table, lora: the runtime's term table and per-row LoRA.
        pad_id: the id left padding is filled with (masked out).
        base_width: the base vocabulary's width (logits past it are term rows).
        prefill_chunk: prefill prompts this many columns per step (None: a whole prompt at once).
        graphs: decode steps as CUDA graphs (default: on CUDA, unless ``DSFT_CUDA_GRAPHS=0``).
        buckets: pad decode steps to the graphs' buckets without graphs (tests: what a graph computes, on CPU).
        overlap: launch each decode step before reading the previous one's tokens (default: on CUDA, with
            slots, unless ``DSFT_OVERLAP=0``; on a CPU nothing runs meanwhile, and tests ask for it).
        prefill_graphs: prefill whole prompts through :class:`dsft.runtime.prefill_graphs.PrefillGraphs` (with
            slots; default: :func:`~dsft.runtime.prefill_graphs.prefill_graphs_wanted`); ``"buckets"``: its bucketed
            inputs run eagerly (tests: what a prefill graph computes, on CPU).
    """

    def __init__(self, model, table: TermTable, lora: MultiLora, pad_id: int, base_width: int, *,
                 prefill_chunk: int | None = None, graphs: bool | None = None, buckets: bool | None = None,
                 overlap: bool | None = None, prefill_graphs: bool | str | None = None):
        from transformers import DynamicCache

        self.model, self.table, self.lora = model, table, lora
        self.pad_id, self.base_width = pad_id, base_width
        self.device = model.device
        self.joinable = kv_cache.joinable(DynamicCache(config=model.config))
        """Whether rows can join a batch that is running (False: sliding-window caches; admit into an empty batch only)."""
        self.slots = SlotDecoder(model, lora, pad_id, graphs=graphs, buckets=buckets) if self.joinable else None
        """The running rows' cache and decode steps (None without :attr:`joinable`)."""
        if overlap is None:
            overlap = self.device.type == "cuda" and os.environ.get("DSFT_OVERLAP", "1") != "0"
        self.overlap = overlap and self.slots is not None
        if prefill_graphs is None:  # (a batch asked to decode without graphs prefills without them too)
            prefill_graphs = prefill_graphs_wanted(model) and graphs is not False
        self.prefill = (PrefillGraphs(model, lora, pad_id, graphs=prefill_graphs is True)
                        if prefill_graphs and self.slots is not None else None)
        """Whole-prompt prefills over bucketed inputs (graphed on a GPU), or None: prefills run as they come."""
        self._unread: _Unread | None = None
        self.prefill_chunk = prefill_chunk
        self._part: _Part | None = None
        self._filling: list[_Fill] = []
        self._layout_key: tuple | None = None
        self._layout: tuple[_Index, tuple[torch.Tensor, torch.Tensor, torch.Tensor], RowGroups] | None = None
        self._token_bytes: int | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def kv_bytes_for(self, lengths: Sequence[int]) -> int | None:
        """Bytes the running rows' KV cache takes when rows of these final lengths (prompt + new tokens) run
        together, as :class:`SlotCache` allocates it (slots and columns rounded up to powers of two); None for a
        model without slots. The first call runs the model on one token to learn the cache's bytes per token."""
        if self.slots is None:
            return None
        if not lengths:
            return 0
        if self._token_bytes is None:
            from transformers import DynamicCache

            probe = DynamicCache(config=self.model.config)
            with torch.inference_mode():
                self.model(input_ids=torch.full((1, 1), self.pad_id, device=self.device), **kv_cache.cache_kwarg(self.model, probe),
                           use_cache=True)
            self._token_bytes = sum(t.numel() * t.element_size() for layer in probe.layers for t in (layer.keys, layer.values))
        return bucket(len(lengths)) * bucket(max(lengths), MIN_WIDTH) * self._token_bytes

    @property
    def rows(self) -> list[Row]:
        """The running rows, in batch order, then the rows whose prompts are still being prefilled."""
        parts = ([] if self._part is None else [self._part]) + [f.part for f in self._filling]
        return [r for p in parts for r in p.rows]

    @property
    def can_admit(self) -> bool:
        """Whether :meth:`admit` may be called now: always with a joinable cache, else only when empty."""
        return self.joinable or not self.rows

    # --- joining ----------------------------------------------------------------------------------------

    def admit(self, rows: Sequence[Row]) -> list[Row]:
        """Prefill ``rows`` and join them to the running rows; each gets its first token when its prompt is
        prefilled: now, or, for prompts longer than ``prefill_chunk``, one chunk per :meth:`step` (so the
        running rows keep decoding while a long prompt is read).

        Returns:
            The rows of ``rows`` that already finished (failed to start, done at their first token).
        Raises:
            RuntimeError: rows cannot join a running batch with this cache (see :attr:`joinable`).
            Exception: what fails the whole prefill (e.g. out of memory).
        """
        if not self.can_admit:
            raise RuntimeError("this model's KV cache (sliding window) cannot take rows into a running batch")
        from transformers import DynamicCache

        done: list[Row] = []
        live: list[Row] = []
        for row in rows:
            start(row, self.device)
            if row.error is None and (row.max_new_tokens <= 0 or not row.prompt):
                row.finish_reason = FINISH_LENGTH
            (live if row.finish_reason is None else done).append(row)
        if not live:
            return done
        ids, mask = left_pad([self.table.to_global(r.prompt, r.key) for r in live], self.pad_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        part = _Part(live, DynamicCache(config=self.model.config), mask[:, :0], positions[:, -1:] + 1,
                     [len(r.prompt) for r in live])
        fill = _Fill(part, ids, mask, positions)
        done += self._fill(fill)
        if fill.part.rows and fill.done < fill.ids.shape[1]:
            fill.fresh = True  # its next chunk waits for the next step
            self._filling.append(fill)
        return done

    def _fill(self, fill: _Fill) -> list[Row]:
        """Prefill the next chunk of ``fill`` (all of it without ``prefill_chunk``); after the last one, sample
        each row's first token and join the rows to the running ones. Returns the rows that finished."""
        part, lo = fill.part, fill.done
        hi = fill.ids.shape[1] if self.prefill_chunk is None else min(fill.ids.shape[1], lo + self.prefill_chunk)
        part.mask = fill.mask[:, :hi]
        if lo == 0 and hi == fill.ids.shape[1] and self.prefill is not None and self.prefill.fits(*fill.ids.shape):
            # The whole prompt at once through a bucket (a graph on a GPU): its cache, the bucket's width, joins now.
            logits, part.cache = self.prefill.forward(fill.ids, fill.mask, part.keys)
            part.mask = torch.cat([fill.mask.new_zeros((fill.mask.shape[0], part.cache.layers[0].keys.shape[2] - hi)),
                                   fill.mask], dim=1)
        else:
            with torch.inference_mode(), self.lora.rows(RowGroups.of(part.keys, self.device)):
                logits = self.model(input_ids=fill.ids[:, lo:hi], attention_mask=part.mask,
                                    position_ids=fill.positions[:, lo:hi], **kv_cache.cache_kwarg(self.model, part.cache), use_cache=True,
                                    logits_to_keep=1).logits[:, -1]
        fill.done = hi
        if hi < fill.ids.shape[1]:
            return []
        done = self._take(part, logits, self._index(part.keys))
        if part.rows:
            self._join(part)
        return done

    def _join(self, part: _Part) -> None:
        """The prefilled rows of ``part`` join the running rows: into the slots after them."""
        run = self._part
        if self.slots is None:  # not joinable: admitted into an empty batch only
            assert run is None
            self._part = part
            return
        n = 0 if run is None else len(run.rows)
        cache = self.slots.cache
        # Room for every row's last token now: the cache does not grow (nor its graphs change) mid-generation.
        final = max(len(r.prompt) + r.max_new_tokens for r in part.rows + ([] if run is None else run.rows))
        cache.reserve(n + len(part.rows), final, n)
        if not cache.allocated:
            cache.allocate_like(part.cache.layers)
        cache.load(n, part.cache.layers, part.lengths)
        if run is None:
            self._part = _Part(part.rows, None, None, None, part.lengths, part.last)
            return
        assert run.last is not None and part.last is not None
        run.last = torch.cat([run.last, part.last])
        run.lengths += part.lengths
        run.rows += part.rows

    # --- decoding ---------------------------------------------------------------------------------------

    def step(self) -> list[Row]:
        """Prefill the next chunk of each prompt being read, then decode one token for every running row;
        returns the rows that finished (they left the batch).

        Raises:
            Exception: what fails the whole forward (e.g. out of memory); the batch is then unusable
            (:meth:`abandon` it).
        """
        done: list[Row] = []
        for fill in list(self._filling):
            if fill.fresh:
                fill.fresh = False
                continue
            done += self._fill(fill)
            if not fill.part.rows or fill.done == fill.ids.shape[1]:
                self._filling.remove(fill)
        return done + self._decode()

    def _decode(self) -> list[Row]:
        part = self._part
        if part is None:
            return []
        if self.overlap:
            return self._decode_overlapped(part)
        assert part.last is not None
        index, shifts, groups = self._layout_of(part.keys)
        ids = TermTable.to_global_tensor(part.last, shifts)
        if self.slots is not None:
            logits = self.slots.forward(ids, part.lengths, part.keys, groups)
            part.lengths = [n + 1 for n in part.lengths]
            return self._take(part, logits, index)
        assert part.mask is not None and part.positions is not None
        ids = ids.unsqueeze(-1)
        part.mask = torch.cat([part.mask, part.mask.new_ones((part.mask.shape[0], 1))], dim=-1)
        with torch.inference_mode(), self.lora.rows(groups):
            logits = self.model(input_ids=ids, attention_mask=part.mask, position_ids=part.positions,
                                **kv_cache.cache_kwarg(self.model, part.cache), use_cache=True).logits[:, -1]
        part.positions = part.positions + 1
        part.lengths = [n + 1 for n in part.lengths]
        return self._take(part, logits, index)

    def _decode_overlapped(self, part: _Part) -> list[Row]:
        """Launch the next token of every running row, then record the tokens of the step before (which waits
        for that step only); the rows those tokens finished leave, and what was launched for them is dropped."""
        assert self.slots is not None and part.last is not None
        unread, self._unread = self._unread, None
        if _worth_launching(part.rows, unread):
            index, shifts, groups = self._layout_of(part.keys)
            logits = self.slots.forward(TermTable.to_global_tensor(part.last, shifts), part.lengths, part.keys, groups)
            part.lengths = [n + 1 for n in part.lengths]
            part.last = sample(self.table.local_logits(logits, index.gather), part.rows, index.widths)
            self._unread = _Unread.of(part.rows, part.last)
        if unread is not None:
            _record(unread.rows, unread.read())
        gone = self._prune(part)
        if self._part is None:
            self._unread = None
        return gone

    def _layout_of(self, keys: list[str | None]):
        """(local vocabulary index, term shifts, LoRA row groups) for ``keys``, recomputed only when the keys
        or the attached adapters' term ranges changed (an attach or detach between steps moves ``table.end``)."""
        key = (tuple(keys), tuple(sorted(self.table.ranges().items())))
        if key != self._layout_key or self._layout is None:
            self._layout = (self._index(keys), self.table.shifts(keys, self.device), RowGroups.of(keys, self.device))
            self._layout_key = key
        return self._layout

    def _index(self, keys: Sequence[str | None]) -> _Index:
        """Gather index to each row's local logits, and each row's own vocabulary width."""
        widths = []
        for k in keys:
            rng = self.table.range_of(k)
            widths.append(max(self.base_width, rng.local_end if rng else 0))
        return _Index(self.table.local_index(keys, self.base_width, self.device), widths)

    def _take(self, part: _Part, logits: torch.Tensor, index: _Index) -> list[Row]:
        """Sample and record one token per row of ``part``, then drop its finished rows."""
        local = sample(self.table.local_logits(logits, index.gather), part.rows, index.widths)
        _record(part.rows, local.tolist())
        part.last = local
        return self._prune(part)

    def _prune(self, part: _Part) -> list[Row]:
        """Slice the finished rows out of ``part`` (cache included) and trim padding no row needs any more."""
        keep = [i for i, r in enumerate(part.rows) if r.finish_reason is None]
        if len(keep) == len(part.rows):
            return []
        gone = [r for r in part.rows if r.finish_reason is not None]
        if not keep:
            part.rows = []
            if part is self._part:
                self._part = None
            return gone
        sel = torch.tensor(keep, device=self.device)
        part.rows = [part.rows[i] for i in keep]
        part.lengths = [part.lengths[i] for i in keep]
        if part.last is not None:
            part.last = part.last[sel]
        if part.cache is None:  # running rows in slots: compact them
            assert self.slots is not None
            self.slots.cache.keep(keep)
            return gone
        assert part.mask is not None and part.positions is not None
        kv_cache.select(part.cache, sel)
        part.mask, part.positions = part.mask[sel], part.positions[sel]
        trim = part.mask.shape[1] - max(part.lengths)
        if trim > 0 and part is self._part:  # (a part still being prefilled has not read its columns yet)
            kv_cache.trim_left(part.cache, trim)
            part.mask = part.mask[:, trim:]
        return gone

    # --- leaving from outside ---------------------------------------------------------------------------

    def evict(self, why: Callable[[Row], BaseException | None]) -> list[Row]:
        """Fail and drop the running rows for which ``why(row)`` gives an exception (e.g. their adapter was
        detached since the last step); the others go on. Returns the dropped rows."""
        for row in self.rows:
            exc = why(row)
            if exc is not None:
                fail(row, exc)
        gone = [] if self._part is None else self._prune(self._part)
        for fill in list(self._filling):
            keep = [i for i, r in enumerate(fill.part.rows) if r.finish_reason is None]
            if len(keep) < len(fill.part.rows):
                if keep:
                    fill.select(keep)
                gone += self._prune(fill.part)
            if not fill.part.rows:
                self._filling.remove(fill)
        return gone

    def abandon(self) -> list[Row]:
        """Empty the batch after a failure of the whole batch; returns the rows that were running."""
        rows, self._part, self._filling, self._unread = self.rows, None, [], None
        return rows


def _record(rows: Sequence[Row], tokens: Sequence[int]) -> None:
    """Each row's sampled token (rows that finished or failed since it was sampled are skipped)."""
    for row, token in zip(rows, tokens, strict=True):
        if row.finish_reason is not None:
            continue
        try:
            advance(row, token)
        except Exception as exc:  # the row's own callbacks or detokenisation
            fail(row, exc)


def _worth_launching(rows: Sequence[Row], unread: _Unread | None) -> bool:
    """Whether some row may need another token after the unread ones: not when each row's unread token is its
    last by length (it ends the row whatever it is)."""
    pending = set() if unread is None else {id(r) for r in unread.rows}
    return any(id(r) not in pending or len(r.tokens) + 1 < r.max_new_tokens for r in rows)


def run_rows(model, table: TermTable, lora: MultiLora, rows: list[Row], pad_id: int, base_width: int) -> None:
    """Generate every row to completion as one batch (filling ``tokens``, ``text``, ``finish_reason``)."""
    batch = RunningBatch(model, table, lora, pad_id, base_width)
    batch.admit(rows)
    while len(batch):
        batch.step()
