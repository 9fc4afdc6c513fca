"""Term-embedding extension: domain terms become new tokens whose rows alone train.

A term that the base tokenizer splits into >= 2 pieces gets a new token id in
``[start, start + n)``, where ``start = len(base_tokenizer)``. Its input row and its output-head
row start as the mean of its pieces' rows. The base matrices stay frozen and untouched: the new
rows are separate parameters, so the base rows cannot receive an update by construction.

When the model's embedding matrix has spare rows beyond the tokenizer (DeepSeek-V2 pads 100k
tokens to 102,400 rows), the new ids land in that padding and the matrix does not grow.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class TermPlan:
    """Which tokens are added, at which ids, initialised from which pieces.

    ``terms`` are the added tokens' strings, in id order: for each chosen term its in-sentence form
    ``" term"`` (with the leading space, as byte-level BPE words carry it) and its text-initial form
    ``"term"``. Adapters written before the spaced form existed list bare terms only; both load alike.
    """

    terms: tuple[str, ...]
    start: int
    pieces: tuple[tuple[int, ...], ...]


def term_forms(term: str) -> tuple[str, str]:
    """The two tokens a term becomes: ``" term"`` inside running text and ``"term"`` at the start of one.

    Only the spaced form makes a term one token in a sentence: with the bare form alone the space
    before it stays a lone token the base never saw there (issue 21.7).
    """
    return " " + term, term


def plan_terms(tokenizer, terms: Sequence[str]) -> TermPlan:
    """Pick the terms the tokenizer splits into >= 2 pieces in running text (deduplicated, in order);
    each adds the forms of :func:`term_forms` that split into >= 2 pieces."""
    chosen, pieces, seen = [], [], set(tokenizer.get_vocab())
    for term in terms:
        # A leading space is how byte-level BPE sees a word inside a sentence; that is the split that costs tokens.
        if term in seen or len(tokenizer.encode(" " + term, add_special_tokens=False)) < 2:
            continue
        seen.add(term)
        for form in term_forms(term):
            ids = tokenizer.encode(form, add_special_tokens=False)
            if len(ids) >= 2 and form not in chosen:
                chosen.append(form)
                pieces.append(tuple(ids))
    return TermPlan(tuple(chosen), len(tokenizer), tuple(pieces))


def plain_terms(added_tokens: Sequence[str]) -> list[str]:
    """The distinct terms behind an adapter's added tokens (``" term"`` and ``"term"`` are one term)."""
    return list(dict.fromkeys(t.strip() for t in added_tokens))


class TermEmbedding(nn.Module):
    """Input embedding = frozen base rows + ``rows`` for ids in ``[start, start + n)``."""

    def __init__(self, base: nn.Embedding, start: int, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.start = start
        self.rows = nn.Parameter(rows)

    @property
    def weight(self) -> torch.Tensor:  # generation utilities read .weight for dtype/device
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = (ids >= self.start) & (ids < self.start + self.rows.shape[0])
        base_ids = torch.where(is_new | (ids >= self.base.num_embeddings), 0, ids)
        out = self.base(base_ids)
        new = self.rows[(ids - self.start).clamp(0, self.rows.shape[0] - 1)].to(out.dtype)
        return torch.where(is_new.unsqueeze(-1), new, out)


class TermHead(nn.Module):
    """Output head whose logits for the new ids come from ``rows``; the vocabulary grows to ``start + n`` if needed."""

    def __init__(self, base: nn.Linear, start: int, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.start = start
        self.rows = nn.Parameter(rows)
        self.plain = False
        """Return the base head's logits only (see :func:`base_logits_only`)."""

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def out_features(self) -> int:
        return max(self.base.out_features, self.start + self.rows.shape[0])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.base(h)
        if self.plain:
            return logits
        new = h @ self.rows.to(h.dtype).t()
        end = self.start + self.rows.shape[0]
        return torch.cat([logits[..., : self.start], new, logits[..., end:]], dim=-1)


@contextmanager
def base_logits_only(model) -> Iterator[None]:
    """While active, a term-extended head gives the base's logits alone: the extended model measures exactly what
    the base measures (new rows unused, LoRA still zero), for a base that is never run before its adapter is
    attached (loaded straight into FSDP shards, :mod:`dsft.base.shard_load`)."""
    head = model.get_output_embeddings()
    if not isinstance(head, TermHead):
        yield
        return
    head.plain = True
    try:
        yield
    finally:
        head.plain = False


def _mean_rows(weight: torch.Tensor, pieces: Sequence[Sequence[int]]) -> torch.Tensor:
    return torch.stack([weight[list(p)].float().mean(0) for p in pieces])


def extend_model(model, tokenizer, plan: TermPlan, rows: dict[str, torch.Tensor] | None = None) -> None:
    """Add the plan's tokens to ``tokenizer`` and wrap the model's embedding and head in place.

    Args:
        rows: trained ``{"embed": [n, d], "head": [n, d]}`` (from an adapter); default: mean-of-pieces init.
    """
    if not plan.terms:
        return
    if len(tokenizer) != plan.start:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens; the term plan starts at {plan.start}")
    tokenizer.add_tokens(list(plan.terms))
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if rows is None:
        rows = {"embed": _mean_rows(embed.weight.data, plan.pieces), "head": _mean_rows(head.weight.data, plan.pieces)}
    # Trainable rows live in fp32 even when the base is bf16: they are few and Adam needs the precision.
    # A base on the meta device (sharded loading) keeps them where they are: they are its adapter's values.
    def place(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.float() if like.is_meta else t.float().to(like.device)

    model.set_input_embeddings(TermEmbedding(embed, plan.start, place(rows["embed"], embed.weight)))
    model.set_output_embeddings(TermHead(head, plan.start, place(rows["head"], head.weight)))
    model.config.vocab_size = max(model.config.vocab_size, plan.start + len(plan.terms))


def term_rows(model) -> dict[str, torch.Tensor]:
    return {"embed": model.get_input_embeddings().rows.detach().cpu(), "head": model.get_output_embeddings().rows.detach().cpu()}


def save_terms(path: Path, model, plan: TermPlan) -> None:
    rows = term_rows(model)
    save_file({k: v.contiguous() for k, v in rows.items()}, str(path), metadata={"start": str(plan.start), "count": str(len(plan.terms))})


def load_terms(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def apply_rows_to_plain_model(model, start: int, rows: dict[str, torch.Tensor]) -> None:
    """Write term rows into a plain (unwrapped) model, resizing it first: how plain PEFT users load an adapter."""
    n = rows["embed"].shape[0]
    if model.get_input_embeddings().num_embeddings < start + n:
        model.resize_token_embeddings(start + n, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[start : start + n] = rows["embed"].to(model.get_input_embeddings().weight.dtype)
        model.get_output_embeddings().weight[start : start + n] = rows["head"].to(model.get_output_embeddings().weight.dtype)


# --- several adapters on one loaded base ---------------------------------------------------------
#
# Each attached adapter numbers its added tokens from ``term_start`` in its own tokenizer (its *local* ids).
# In a model serving several adapters at once those ranges would collide, so every adapter's tokens get
# their own *global* range after the base's ids: ``[start, start + count)``. The embedding and head below
# see global ids only; a row of a batch is translated between its adapter's local ids and the global ones
# on the way in (:meth:`TermTable.to_global`) and out (:meth:`TermTable.local_index`), so each row sees
# exactly the vocabulary it would see with only its own adapter attached.


@dataclass(frozen=True)
class TermRange:
    """Where one adapter's added tokens live: local ids ``[local_start, local_start + count)`` (as its own
    tokenizer numbers them) are global ids ``[start, start + count)`` in the loaded model."""

    local_start: int
    start: int
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count

    @property
    def local_end(self) -> int:
        return self.local_start + self.count


class TermTable:
    """The term rows of every attached adapter, each adapter in its own global id range.

    Ranges are allocated first-fit from ``first_id`` (past every base id: the embedding's rows, the
    head's rows and the tokenizer), so detaching an adapter leaves a gap that the next one may reuse.
    Rows are plain tensors owned by the table: dropping a key drops the last reference to them.
    """

    def __init__(self, first_id: int):
        self.first_id = first_id
        self._ranges: dict[str, TermRange] = {}
        self._rows: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._ranges

    @property
    def end(self) -> int:
        """One past the largest global id in use (the width of the head's output)."""
        return max((r.end for r in self._ranges.values()), default=self.first_id)

    def ranges(self) -> dict[str, TermRange]:
        return dict(self._ranges)

    def range_of(self, key: str | None) -> TermRange | None:
        return self._ranges.get(key) if key is not None else None

    def rows(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self._rows[key]

    def nbytes(self, key: str | None = None) -> int:
        keys = [key] if key is not None else list(self._rows)
        return sum(t.untyped_storage().nbytes() for k in keys if k in self._rows for t in self._rows[k])

    def add(self, key: str, local_start: int, embed: torch.Tensor, head: torch.Tensor) -> TermRange:
        """Give ``key``'s ``n`` rows a free global range (first fit); replaces ``key`` if present."""
        if embed.shape != head.shape:
            raise ValueError(f"term rows of {key}: embed {tuple(embed.shape)} and head {tuple(head.shape)} differ")
        self.remove(key)
        n, start = embed.shape[0], self.first_id
        for r in sorted(self._ranges.values(), key=lambda r: r.start):
            if r.start - start >= n:
                break
            start = max(start, r.end)
        rng = TermRange(local_start, start, n)
        self._ranges[key] = rng
        self._rows[key] = (embed, head)
        return rng

    def remove(self, key: str) -> None:
        self._ranges.pop(key, None)
        self._rows.pop(key, None)

    def to_global(self, ids: Sequence[int], key: str | None) -> list[int]:
        """A prompt tokenised by ``key``'s tokenizer, in global ids."""
        r = self.range_of(key)
        if r is None or not r.count:
            return list(ids)
        shift = r.start - r.local_start
        return [i + shift if r.local_start <= i < r.local_end else i for i in ids]

    def shifts(self, keys: Sequence[str | None], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row ``(local_start, local_end, global - local)`` for :meth:`to_global_tensor`."""
        rs = [self.range_of(k) for k in keys]
        lo = torch.tensor([r.local_start if r else 0 for r in rs], device=device)
        hi = torch.tensor([r.local_end if r else 0 for r in rs], device=device)
        shift = torch.tensor([r.start - r.local_start if r else 0 for r in rs], device=device)
        return lo, hi, shift

    @staticmethod
    def to_global_tensor(ids: torch.Tensor, shifts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Local ids ``[B]`` (one per row, e.g. sampled tokens) to global ids, with :meth:`shifts` of the rows."""
        lo, hi, shift = shifts
        return torch.where((ids >= lo) & (ids < hi), ids + shift, ids)

    def local_index(self, keys: Sequence[str | None], base_width: int, device) -> torch.Tensor:
        """Gather index ``[B, W]`` from global logits (with one extra ``-inf`` column appended) to each row's
        local logits: the base's ``base_width`` logits with the row's own term range in place, exactly what
        :class:`TermHead` gives with only that adapter attached. Columns past a row's width point at ``-inf``."""
        rs = [self.range_of(k) for k in keys]
        width = max([base_width] + [r.local_end for r in rs if r])
        neg = self.end  # index of the appended -inf column
        idx = torch.arange(width, device=device).repeat(len(rs), 1)
        idx[:, base_width:] = neg
        for i, r in enumerate(rs):
            if r and r.count:
                idx[i, r.local_start : r.local_end] = torch.arange(r.start, r.end, device=device)
        return idx

    def local_logits(self, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Global logits ``[B, V]`` -> local logits ``[B, W]`` through :meth:`local_index`."""
        ext = torch.cat([logits, logits.new_full((*logits.shape[:-1], 1), float("-inf"))], dim=-1)
        return ext.gather(-1, index)


class MultiTermEmbedding(nn.Module):
    """Input embedding over global ids: base rows, then each attached adapter's rows in its own range."""

    def __init__(self, base: nn.Embedding, table: TermTable):
        super().__init__()
        self.base = base
        self.table = table

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.base(torch.where(ids >= self.base.num_embeddings, 0, ids))
        for key, r in self.table.ranges().items():
            if not r.count:
                continue
            embed, _ = self.table.rows(key)
            inside = (ids >= r.start) & (ids < r.end)
            new = embed[(ids - r.start).clamp(0, r.count - 1)].to(out.dtype)
            out = torch.where(inside.unsqueeze(-1), new, out)
        return out


class MultiTermHead(nn.Module):
    """Output head over global ids: base logits, then each adapter's term logits at its range (gaps ``-inf``)."""

    def __init__(self, base: nn.Linear, table: TermTable):
        super().__init__()
        self.base = base
        self.table = table

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def out_features(self) -> int:
        return max(self.base.out_features, self.table.end)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.base(h)
        end = self.table.end
        if end <= self.table.first_id and logits.shape[-1] >= self.table.first_id:
            return logits
        parts = [logits, logits.new_full((*logits.shape[:-1], self.table.first_id - logits.shape[-1]), float("-inf"))]
        cursor = self.table.first_id
        for key, r in sorted(self.table.ranges().items(), key=lambda kv: kv[1].start):
            if r.start > cursor:
                parts.append(logits.new_full((*logits.shape[:-1], r.start - cursor), float("-inf")))
            _, head = self.table.rows(key)
            parts.append(h @ head.to(h.dtype).t())
            cursor = r.end
        return torch.cat(parts, dim=-1)
