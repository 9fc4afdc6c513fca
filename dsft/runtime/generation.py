"""Rows and what happens to one row per token: a row, its sampling, its text stream with stop strings.

Logits are taken per row in its adapter's *local* vocabulary (:meth:`dsft.adapters.terms.TermTable.local_index`),
so sampling and the returned ids are what that adapter alone would give; the next input is translated
back to global ids. The decode loop that runs rows together, with rows joining and leaving at token
boundaries, is :mod:`dsft.runtime.batching`.

This module knows nothing of the registry or HTTP: :class:`dsft.runtime.base.RuntimeBase` prepares the
rows, :class:`dsft.runtime.engine.Engine` batches requests into them.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from dsft.adapters.terms import TermTable
from dsft.errors import UsageError
from dsft.runtime.multilora import MultiLora
from dsft.runtime.row_groups import RowGroups

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"

MIN_TEMPERATURE = 1e-2
"""Below this, ``logits / temperature`` overflows to inf in fp32/bf16 for ordinary logits (1e-45 gives NaN
probabilities): ask for 0 (greedy) instead."""
MAX_SEED = 2**64 - 1
"""The largest seed a torch generator takes."""

log = logging.getLogger("dsft.runtime")


def check_sampling(*, max_new_tokens: int, temperature: float, top_p: float, seed: int | None) -> None:
    """Refuse limits and sampling settings no row can run with, before any work.

    Raises:
        UsageError: naming the setting, the accepted range and the value.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not math.isfinite(temperature) or not (temperature == 0 or temperature >= MIN_TEMPERATURE):
        raise UsageError(f"temperature must be 0 (greedy) or >= {MIN_TEMPERATURE} (smaller values overflow), "
                         f"got {temperature!r}")
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise UsageError(f"top_p must be in (0, 1], got {top_p!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise UsageError(f"seed must be an integer from 0 to 2**64-1, got {str(seed)[:40]}")


def _decoder(tokenizer) -> tuple[Callable[[list[int]], str], bool]:
    """A fast ``ids -> text`` for ``tokenizer`` (its Rust backend when nothing in Python post-processes), and
    whether a window of ids decodes to the matching piece of the whole text (not so when clean-up may join
    characters across the window's edge)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return (lambda ids: backend.decode(ids, skip_special_tokens=True)), True
    return (lambda ids: tokenizer.decode(ids, skip_special_tokens=True)), False


class TextStream:
    """Incremental detokenisation with stop strings.

    ``push(token)`` returns the new text that is safe to show: characters that might still turn into a
    stop string, and a trailing incomplete UTF-8 sequence, are held back until they are decided. With
    nobody listening (``live`` false) and no stop strings, nothing is decoded until :meth:`flush`.

    Each push decodes a window of the last few ids, not the whole sequence (which cost 0.4 ms at 2,000
    tokens on the CI machine, per row and per token: the host's time of a decode step with many long rows): the ids since
    the last piece was taken, after the ids of that piece as context, so that a tokenizer that drops a
    leading space at the start of a decode treats both decodes alike (vLLM's incremental detokenizer).
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), live: bool = True):
        self.decode, self.windowed = _decoder(tokenizer)
        self.vocab = len(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self.live = live or bool(self.stop)
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._context = self._read = 0
        """``ids[_context:_read]``: the ids of the last piece taken into ``text``, decoded again as context."""

    def push(self, token: int) -> str:
        if token < self.vocab:  # ids past the tokenizer (padding rows of the embedding) have no text
            self.ids.append(token)
        if not self.live:
            return ""
        if not self._take():
            return ""
        if self.stop:
            found = [i for i in (self.text.find(s, max(0, self.sent - self.hold)) for s in self.stop) if i >= 0]
            if found:
                self.text, self.stopped = self.text[: min(found)], True
                return self.flush()
        upto = max(self.sent, len(self.text) - self.hold)
        delta, self.sent = self.text[self.sent : upto], upto
        return delta

    def _take(self) -> bool:
        """Bring ``text`` up to the ids pushed; False while they end inside an incomplete character."""
        if not self.windowed:
            text = self.decode(self.ids)
            if text.endswith("\ufffd"):
                return False
            self.text = text
            return True
        before = self.decode(self.ids[self._context : self._read])
        now = self.decode(self.ids[self._context :])
        if now.endswith("\ufffd"):
            return False
        if len(now) > len(before):
            self.text += now[len(before) :]
            self._context, self._read = self._read, len(self.ids)
        return True

    def flush(self) -> str:
        if not self.live:
            self.text = self.decode(self.ids)
        delta, self.sent = self.text[self.sent :], len(self.text)
        return delta


@dataclass
class Row:
    """One sequence to generate. ``prompt`` holds *local* ids (the adapter's tokenizer)."""

    prompt: list[int]
    key: str | None
    tokenizer: object
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    eos_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    on_text: Callable[[str], bool | None] | None = None
    """Called with each new piece of text; returning False cancels the row (a client went away)."""
    cancelled: Callable[[], bool] | None = None
    """Asked after every token; True ends the row (for rows nobody streams)."""
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: BaseException | None = None
    """Why this row alone failed (``finish_reason`` is then ``error``); the other rows of its batch go on."""
    stream: TextStream | None = field(default=None, repr=False)
    generator: torch.Generator | None = field(default=None, repr=False)


def _emit(row: Row, delta: str) -> None:
    if delta and row.on_text is not None and row.on_text(delta) is False:
        row.finish_reason = FINISH_CANCELLED


def advance(row: Row, token: int) -> None:
    """Record one sampled token and decide whether the row is done."""
    if row.cancelled is not None and row.cancelled():
        row.finish_reason = FINISH_CANCELLED
    elif token in row.eos_ids and not row.ignore_eos:
        row.finish_reason = FINISH_STOP
    else:
        row.tokens.append(token)
        _emit(row, row.stream.push(token))
        if row.stream.stopped:
            row.finish_reason = row.finish_reason or FINISH_STOP
        elif len(row.tokens) >= row.max_new_tokens:
            row.finish_reason = row.finish_reason or FINISH_LENGTH
    if row.finish_reason is not None:
        if row.finish_reason != FINISH_CANCELLED:
            _emit(row, row.stream.flush())
        row.text = row.stream.text


def start(row: Row, device) -> None:
    """Give ``row`` its text stream and, when it samples, its own generator (seeded by the request, else at
    random): each sampled row draws from its own generator only, so its tokens do not depend on which rows
    share its batch. A row that cannot start fails alone (:func:`fail`)."""
    try:
        row.stream = TextStream(row.tokenizer, row.stop, live=row.on_text is not None)
        if row.temperature > 0:
            row.generator = torch.Generator(device=device)
            row.generator.manual_seed(row.seed if row.seed is not None else int(torch.randint(0, 2**62, ()).item()))
    except Exception as exc:
        fail(row, exc)


def fail(row: Row, exc: BaseException) -> None:
    """End ``row`` alone with ``exc`` (its batch goes on without it)."""
    log.warning("a row failed and left its batch: %s: %s", type(exc).__name__, exc)
    row.error, row.finish_reason = exc, FINISH_ERROR
    if row.stream is not None:
        row.text = row.stream.text


def sample_row(scores: torch.Tensor, row: Row) -> torch.Tensor:
    """One token (a 0-d tensor on the logits' device: no wait for the GPU) from one row's logits: temperature +
    nucleus (top-p) sampling with the row's generator."""
    scores = scores.float() / row.temperature
    if row.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs > row.top_p  # keep the smallest prefix whose mass reaches top_p
        scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
    return torch.multinomial(scores.softmax(-1), 1, generator=row.generator)[0]


def sample(logits: torch.Tensor, rows: Sequence[Row], widths: Sequence[int] | None = None) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else :func:`sample_row` on the row's own ``widths[i]``
    logits (its adapter's vocabulary). A row whose sampling raises is failed alone (:func:`fail`); its entry
    keeps the greedy token, which nobody reads.

    The width matters: ``torch.multinomial`` draws one random number per column, so sampling over columns a
    wider row in the same batch added (``-inf`` for this row) would move this row's generator differently
    and its next tokens would depend on who shares its batch."""
    out = logits.argmax(-1)
    for i, row in enumerate(rows):
        if row.temperature <= 0:
            continue
        try:
            out[i] = sample_row(logits[i] if widths is None else logits[i, : widths[i]], row)
        except Exception as exc:
            fail(row, exc)
    return out


def left_pad(prompts: Sequence[Sequence[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def forward_rows(model, table: TermTable, lora: MultiLora, prompts: Sequence[Sequence[int]], keys: Sequence[str | None],
                 pad_id: int, base_width: int) -> list[torch.Tensor]:
    """Local logits of every prompt position, per row (``[len(prompt), row's vocabulary]``)."""
    device = model.device
    ids, mask = left_pad([table.to_global(p, k) for p, k in zip(prompts, keys)], pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode(), lora.rows(RowGroups.of(keys, device)):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
    out = []
    for i, (p, k) in enumerate(zip(prompts, keys)):
        index = table.local_index([k], base_width, device)
        rng = table.range_of(k)
        width = max(base_width, rng.local_end if rng else 0)
        row = logits[i, ids.shape[1] - len(p):]
        out.append(table.local_logits(row, index.expand(row.shape[0], -1))[:, :width].float())
    return out
