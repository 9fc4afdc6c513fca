"""Pack variable-length examples into full ``seq_len`` rows, each example attending only to itself.

A packed row holds several examples back to back; ``position_ids`` restart at 0 at every example
(and at the row's padding tail), and the model is called with ``attention_mask=None`` and those
``position_ids`` (:func:`model_inputs`) and no KV cache. transformers (5.x ``masking_utils``) then
reads the example boundaries from the position ids and makes the attention block-diagonal and causal
(tests/data/test_packing.py checks sdpa and eager on every tiny MoE family; measured with 5.24 and
5.17, on CPU and CUDA, and flex attention on CUDA: packed logits within 3e-7 of each example alone). The first token of every example takes no loss, so no example is trained
to predict the next one's start: a packed example's loss equals its loss alone in a row.

Rows are filled best-fit decreasing over consecutive windows of examples: deterministic for a given
order, and on SFT-like length distributions (median a few hundred tokens, tail to ``seq_len``) the
padding is a fraction of a percent apart from the last window's rows.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

IGNORE = -100

WINDOW = 1024
"""Examples considered together by best-fit decreasing: more packs tighter, fewer keeps the order local."""


class SequenceSource(Protocol):
    """Variable-length examples packing can draw from: in memory (:class:`Sequences`) or memory-mapped Arrow."""

    @property
    def lengths(self) -> torch.Tensor: ...

    def __len__(self) -> int: ...

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class Sequences:
    """Variable-length tokenised examples, stored flat: example ``i`` is ``input_ids[offsets[i]:offsets[i+1]]``."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    offsets: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.shape != self.labels.shape or self.input_ids.dim() != 1 or self.offsets.dim() != 1:
            raise ValueError("Sequences needs 1-D input_ids and labels of one length and 1-D offsets")

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    @property
    def lengths(self) -> torch.Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.input_ids[lo:hi], self.labels[lo:hi]

    def targets(self) -> torch.Tensor:
        """Tokens that take loss per example (the first token never does: see the module docstring)."""
        counted = (self.labels != IGNORE).long()
        counted[self.offsets[:-1][self.lengths > 0]] = 0
        cum = torch.cat([counted.new_zeros(1), counted.cumsum(0)])
        return cum[self.offsets[1:]] - cum[self.offsets[:-1]]

    @staticmethod
    def from_lists(rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> Sequences:
        lengths = [len(x) for x, _ in rows]
        offsets = torch.tensor([0, *lengths], dtype=torch.long).cumsum(0)
        flat_ids = [t for x, _ in rows for t in x]
        flat_labels = [t for _, y in rows for t in y]
        return Sequences(torch.tensor(flat_ids, dtype=torch.long), torch.tensor(flat_labels, dtype=torch.long), offsets)


def best_fit(lengths: Sequence[int], capacity: int, window: int = WINDOW) -> list[list[int]]:
    """Group indices of ``lengths`` into rows of at most ``capacity`` tokens, best-fit decreasing per window.

    Within each window of ``window`` consecutive examples, the longest goes first into the open row
    with the least room that still fits it (a new row when none does). Ties keep the input order, so
    the result depends only on ``lengths``. Rows come out window by window, fullest first within one.

    Raises:
        ValueError: an example is longer than ``capacity``.
    """
    rows: list[list[int]] = []
    for lo in range(0, len(lengths), window):
        idx = sorted(range(lo, min(lo + window, len(lengths))), key=lambda i: -lengths[i])
        free: list[tuple[int, int]] = []  # (room left, row number), sorted
        first = len(rows)
        for i in idx:
            n = lengths[i]
            if n > capacity:
                raise ValueError(f"example {i} has {n} tokens, more than a row's {capacity}")
            at = bisect.bisect_left(free, (n, -1))
            if at == len(free):
                rows.append([i])
                bisect.insort(free, (capacity - n, len(rows) - 1))
            else:
                room, r = free.pop(at)
                rows[r].append(i)
                bisect.insort(free, (room - n, r))
        # fullest rows first: a caller that keeps a prefix of the rows cuts the emptiest ones of its last window
        rows[first:] = sorted(rows[first:], key=lambda r: (-sum(lengths[i] for i in r), r[0]))
    return rows


def pack_rows(get: Callable[[Any], tuple[torch.Tensor, torch.Tensor]], rows: Sequence[Sequence[Any]], seq_len: int,
              pad_id: int) -> dict[str, torch.Tensor]:
    """Lay out ``rows`` (lists of example keys; ``get(key)`` gives that example's ids and labels) as ``[len(rows), seq_len]``.

    Returns ``input_ids``, ``labels`` (-100 on padding and on every example's first token),
    ``attention_mask`` (1 on real tokens) and ``position_ids`` (restarting at 0 per example and at the padding).
    """
    n = len(rows)
    ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    pos = torch.zeros((n, seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for key in row:
            x, y = get(key)
            length = len(x)
            ids[r, at : at + length] = torch.as_tensor(x)
            labels[r, at : at + length] = torch.as_tensor(y)
            labels[r, at] = IGNORE
            pos[r, at : at + length] = torch.arange(length)
            at += length
        mask[r, :at] = 1
        pos[r, at:] = torch.arange(seq_len - at)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos}


def padding_share(attention_mask: torch.Tensor) -> float:
    """Share of positions that are padding (0 for no rows)."""
    return 1.0 - float(attention_mask.float().mean()) if attention_mask.numel() else 0.0


def model_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """The keyword arguments for a model or decoder call on ``batch`` (without ``labels``).

    Packed rows give ``position_ids`` and no attention mask, so transformers builds the per-example
    block-diagonal causal mask; batches without ``position_ids`` keep their ``attention_mask``. Batches with
    ``seq_lens`` (:func:`row_lengths`) also give the examples' offsets to variable-length
    attention (``dsft_cu_seqlens``; other attention implementations ignore the keyword). Call
    with ``use_cache=False``: transformers reads packed sequences only when there is no KV cache.
    """
    if batch.get("position_ids") is not None:
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "attention_mask": None}
        if batch.get("seq_lens") is not None:  # the examples' lengths, for variable-length attention
            inputs[CU_KEY] = cu_seqlens(batch["seq_lens"])
        return inputs
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}


def segment_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Per position, the number of its example within the row (0, 1, ...): a new one starts where positions restart."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts.long().cumsum(1) - 1


CU_KEY = "dsft_cu_seqlens"
"""The decoder forward's keyword that carries the examples' offsets down to every attention call
(:mod:`dsft.kernels.varlen`)."""

MIN_SLOTS = 16
"""Fewest example slots a row gets in ``seq_lens``: slot counts are powers of two from here, so that the batches of
one data set (and of most data sets) share one shape."""


def _slots_for(examples: int) -> int:
    return max(MIN_SLOTS, 1 << (examples - 1).bit_length())


def row_lengths(position_ids: torch.Tensor, slots: int | None = None) -> torch.Tensor:
    """The lengths of the examples in each packed row, ``[rows, slots]`` int32, zeros after a row's last example.

    An example starts where positions do not continue (``pos[i] != pos[i - 1] + 1``) and at every row's start; the
    padding after a row's examples (positions restarting at 0) counts as one more. ``slots`` defaults to the most
    examples any row holds, rounded up to a power of two (at least 16), so batches of one data set share a shape."""
    rows, seq = position_ids.shape
    starts = torch.ones((rows, seq), dtype=torch.bool, device=position_ids.device)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    example = starts.long().cumsum(1) - 1
    need = int(example[:, -1].max()) + 1 if rows else 1
    if slots is None:
        slots = _slots_for(need)
    if need > slots:
        raise ValueError(f"row_lengths: a row holds {need} examples, more than slots={slots}")
    lengths = torch.zeros((rows, slots), dtype=torch.int32, device=position_ids.device)
    return lengths.scatter_add_(1, example, torch.ones_like(example, dtype=torch.int32))


def slots_needed(position_ids: torch.Tensor) -> int:
    """:func:`row_lengths`' default ``slots`` for these rows (run once over a whole data set: one shape for all of it)."""
    need = 1
    for lo in range(0, position_ids.shape[0], 4096):  # a few rows at a time: no copy of a whole data set's positions
        rows = position_ids[lo : lo + 4096]
        if rows.shape[1] > 1:
            need = max(need, int((rows[:, 1:] != rows[:, :-1] + 1).sum(1).max()) + 1)
    return _slots_for(need)


def cu_seqlens(seq_lens: torch.Tensor) -> torch.Tensor:
    """``[rows * slots + 1]`` int32 offsets of the examples of ``seq_lens`` (:func:`row_lengths`) laid end to end,
    the empty slots moved to the end (zero-length examples there cost the kernel nothing; between examples they
    cost up to 60%, measured). Fixed-shape device ops: no sync, so it runs inside a CUDA graph."""
    flat = seq_lens.reshape(-1)
    order = torch.argsort((flat == 0).to(torch.int8), stable=True)
    return torch.nn.functional.pad(flat[order].cumsum(0, dtype=torch.int32), (1, 0))
