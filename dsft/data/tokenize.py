"""Records -> token tensors: raw text is packed into full blocks, instructions and chats are packed
best-fit into full rows with each example attending only to itself (:mod:`dsft.data.packing`).

Every example row is ``seq_len`` tokens with four rows of the same shape:

* ``input_ids``: token ids, right-padded with the tokenizer's pad id (EOS when it has none);
* ``labels``: the targets *before* the shift (the training loop shifts by one); ``-100`` where no
  loss is taken: padding, prompts, system and user turns, and the first token of every example;
* ``attention_mask``: 1 on real tokens, 0 on padding (for counting; the model gets ``position_ids``);
* ``position_ids``: restart at 0 at every packed example; the model is called through
  :func:`dsft.data.packing.model_inputs` so that attention stays inside each example.

The tokenizer is anything shaped like ``transformers.PreTrainedTokenizerFast``: callable on a
list of texts, with ``eos_token_id`` and ``pad_token_id`` (and ``apply_chat_template`` for chats).
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch

from dsft.data.files import Record
from dsft.data.packing import Sequences, best_fit, pack_rows
from dsft.data.prompt import IGNORE, encode_chat, encode_chats, encode_instruction, pad_id
from dsft.data.prompt import check_seq_len as _check_seq_len
from dsft.data.prompt import encode_texts as _encode_batch
from dsft.data.prompt import eos_id as _eos_id
from dsft.data.records import Message
from dsft.errors import DataError

log = logging.getLogger("dsft.data")

__all__ = ["IGNORE", "Examples", "build_examples", "collate", "count_tokens", "encode_chat", "encode_instruction",
           "pack_texts"]
# encode_instruction / encode_chat live in dsft.data.prompt: serving renders prompts with the same code.

KEYS = ("input_ids", "labels", "attention_mask", "position_ids")


@dataclass(frozen=True)
class Examples:
    """A set of tokenised rows, all ``[N, seq_len]`` long tensors; a map-style torch Dataset.

    ``position_ids`` defaults to ``0 .. seq_len-1`` on every row (one example per row).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.position_ids is None:
            n, s = self.input_ids.shape if self.input_ids.dim() == 2 else (0, 0)
            object.__setattr__(self, "position_ids", torch.arange(s).expand(n, s).contiguous())
        shapes = {tuple(getattr(self, k).shape) for k in KEYS}
        if len(shapes) != 1 or self.input_ids.dim() != 2:
            raise ValueError(f"input_ids, labels, attention_mask and position_ids must share one [N, seq_len] shape, got {shapes}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k)[i] for k in KEYS}

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def select(self, index: torch.Tensor | Sequence[int]) -> Examples:
        """The rows at ``index`` (repeats allowed), in that order."""
        index = torch.as_tensor(index, dtype=torch.long)
        return Examples(*(getattr(self, k)[index] for k in KEYS))

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in KEYS}

    @staticmethod
    def from_dict(tensors: Mapping[str, Any]) -> Examples:
        return Examples(*(torch.as_tensor(tensors[k], dtype=torch.long) if tensors.get(k) is not None else None
                          for k in KEYS))

    @staticmethod
    def empty(seq_len: int) -> Examples:
        return Examples(*(torch.zeros((0, seq_len), dtype=torch.long) for _ in KEYS))

    @staticmethod
    def cat(parts: Sequence[Examples], seq_len: int | None = None) -> Examples:
        """Concatenate along the row axis; ``seq_len`` is needed only when ``parts`` is empty."""
        if not parts:
            if seq_len is None:
                raise ValueError("Examples.cat of no parts needs seq_len")
            return Examples.empty(seq_len)
        lens = {p.seq_len for p in parts}
        if len(lens) != 1:
            raise ValueError(f"cannot concatenate examples of different seq_len {sorted(lens)}")
        return Examples(*(torch.cat([getattr(p, k) for p in parts]) for k in KEYS))


def count_tokens(examples: Examples | Mapping[str, torch.Tensor]) -> int:
    """Tokens that take loss once the training loop shifts labels by one (the first column never does)."""
    labels = examples.labels if isinstance(examples, Examples) else torch.as_tensor(examples["labels"])
    return int((labels[:, 1:] != IGNORE).sum())


def collate(batch: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack ``Examples[i]`` items into a batch; ``DataLoader(examples, batch_size=8, collate_fn=collate)``."""
    return {k: torch.stack([item[k] for item in batch]) for k in KEYS}


# --- raw text -------------------------------------------------------------------------------


def pack_texts(tokenizer: Any, texts: Sequence[str], seq_len: int, add_eos: bool = True) -> torch.Tensor:
    """Concatenate documents (each followed by EOS) and cut the stream into full ``seq_len`` blocks.

    The remainder after the last full block is dropped. When all documents together are shorter
    than one block, the result is a single block right-padded with the pad id; the caller must mask
    those positions (``labels[ids == pad_token_id] = -100``); :func:`build_examples` does this for
    you, and is exact even when the pad id equals EOS. Labels of packed blocks are the inputs
    themselves: documents attend across the EOS boundaries, as in GPT-style pre-training.

    Args:
        tokenizer: a Hugging Face tokenizer.
        texts: the documents.
        seq_len: tokens per block.
        add_eos: append EOS after each document (unless its encoding already ends with one).

    Returns:
        ``LongTensor [N, seq_len]``; ``N`` is 0 when ``texts`` is empty.

    Raises:
        UsageError: ``seq_len`` < 2, or the tokenizer has no EOS token.
    """
    return _pack(tokenizer, texts, seq_len, add_eos).input_ids


def _pack(tokenizer: Any, texts: Sequence[str], seq_len: int, add_eos: bool = True) -> Examples:
    _check_seq_len(seq_len)
    eos = _eos_id(tokenizer)
    stream: list[int] = []
    for ids in _encode_batch(tokenizer, list(texts), special=True, split=True):
        stream.extend(ids)
        if add_eos and (not ids or ids[-1] != eos):
            stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        if not stream:
            return Examples.empty(seq_len)
        return Examples(**pack_rows(lambda _: (stream, stream), [[0]], seq_len, pad_id(tokenizer)))
    ids = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return Examples(ids, ids.clone(), torch.ones_like(ids))


# --- records -> examples ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizeStats:
    """What tokenising a list of records gave (the data plan shows it per source)."""

    records: dict[str, int]
    """Records per kind (``text``, ``instruction``, ``chat``)."""
    examples: int
    tokens: int
    truncated: int
    """Instruction/chat records cut to ``seq_len`` (their start kept)."""
    dropped: int
    """Instruction/chat records with no response token within ``seq_len`` (not trained on)."""

    def to_json(self) -> dict[str, Any]:
        return {"records": self.records, "examples": self.examples, "tokens": self.tokens,
                "truncated": self.truncated, "dropped": self.dropped}


def encode_records(tokenizer: Any, records: Iterable[Record], seq_len: int, stats: dict[str, Any],
                   chunk: int = 1024) -> Iterator[tuple[list[int], list[int]]]:
    """Stream ``(input_ids, labels)`` examples of at most ``seq_len`` tokens from ``records``.

    Raw texts are concatenated (each followed by EOS) and cut into full ``seq_len`` blocks as they
    come (GPT-style, see :func:`pack_texts`; if all of them are shorter than one block they make one
    shorter example); each instruction or chat record is one example, cut to ``seq_len`` (counted as
    truncated). An instruction or chat whose prompt fills all of ``seq_len`` (no response token
    left) would train nothing; it is dropped with a warning on the ``dsft.data`` logger. Records are
    read ``chunk`` at a time, so memory holds one chunk, not the corpus. ``stats`` is filled as the
    stream goes (see :class:`TokenizeStats`).

    Raises:
        UsageError: ``seq_len`` < 2, or the tokenizer has no EOS token.
        DataError: a chat cannot be rendered (names the record's source), or, at the end, no
            instruction/chat record has a response token within ``seq_len`` and there is no raw text.
    """
    _check_seq_len(seq_len)
    eos = _eos_id(tokenizer)
    stats.update(records={}, examples=0, tokens=0, truncated=0, dropped=0)
    stream: list[int] = []
    blocks = kept = 0
    dropped: list[str] = []
    it = iter(records)
    while batch := list(islice(it, chunk)):
        texts = [r.text for r in batch if r.kind == "text"]
        for ids in _encode_batch(tokenizer, texts, special=True, split=True):
            stream.extend(ids)
            if not ids or ids[-1] != eos:
                stream.append(eos)
        while len(stream) >= seq_len:
            block, stream = stream[:seq_len], stream[seq_len:]
            blocks += 1
            yield _counted(stats, block, list(block))
        pairs = [r for r in batch if r.kind != "text"]
        encoded = iter(_encode_pairs(tokenizer, pairs))
        for r in batch:
            stats["records"][r.kind] = stats["records"].get(r.kind, 0) + 1
            if r.kind == "text":
                continue
            ids, labels = next(encoded)  # encoded whole, then cut here: so that truncation can be counted
            if len(ids) > seq_len:
                stats["truncated"] += 1
                ids, labels = ids[:seq_len], labels[:seq_len]
            # the first token never takes loss (it has no context; packed, it would be the previous example's target)
            if all(x == IGNORE for x in labels[1:]):
                dropped.append(r.source)
                stats["dropped"] += 1
            else:
                kept += 1
                yield _counted(stats, ids, labels)
    if stream and not blocks:
        yield _counted(stats, stream, list(stream))
    has_text = bool(blocks or stream)
    if dropped:
        if not kept and not has_text:
            raise DataError(f"{dropped[0]}: no record has a response token within seq_len={seq_len} "
                            f"({len(dropped)} prompt(s) too long); raise seq_len or shorten the prompts")
        log.warning("dropped %d record(s) whose prompt fills seq_len=%d (first: %s); raise seq_len to keep them",
                    len(dropped), seq_len, dropped[0])


def _conversation(r: Record) -> list:
    return [Message("user", r.prompt), Message("assistant", r.response)] if r.kind == "instruction" else list(r.messages)


def _encode_pairs(tokenizer: Any, records: list[Record]) -> list[tuple[list[int], list[int]]]:
    """Uncut ``(ids, labels)`` of instruction and chat records, batched; a failure names its record's source."""
    try:
        return encode_chats(tokenizer, [_conversation(r) for r in records], _UNCUT)
    except DataError:
        for r in records:  # find the record that fails, to name it
            try:
                encode_chat(tokenizer, _conversation(r), _UNCUT)
            except DataError as e:
                raise DataError(f"{r.source}: {e}") from None
        raise


def _counted(stats: dict[str, Any], ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    stats["examples"] += 1
    stats["tokens"] += len(ids)
    return ids, labels


def tokenize_records(tokenizer: Any, records: Iterable[Record], seq_len: int) -> tuple[Sequences, TokenizeStats]:
    """All of :func:`encode_records` in memory: ``(sequences, stats)`` (same errors)."""
    stats: dict[str, Any] = {}
    seqs = Sequences.from_lists(list(encode_records(tokenizer, records, seq_len, stats)))
    return seqs, TokenizeStats(**stats)


_UNCUT = 1 << 62


def pack_examples(seqs: Sequences, seq_len: int, pad_id: int) -> Examples:
    """Pack ``seqs`` best-fit into ``seq_len`` rows (:func:`dsft.data.packing.best_fit`), in their order."""
    rows = best_fit(seqs.lengths.tolist(), seq_len)
    return Examples(**pack_rows(seqs.example, rows, seq_len, pad_id)) if rows else Examples.empty(seq_len)


def build_examples(tokenizer: Any, records: Sequence[Record], seq_len: int) -> Examples:
    """Tokenise records (:func:`tokenize_records`) and pack them into full ``seq_len`` rows.

    Raw texts fill whole rows (GPT-style blocks); instruction and chat examples are packed best-fit
    several to a row, each attending only to itself (``position_ids`` restart per example).

    Args:
        tokenizer: a Hugging Face tokenizer with an EOS token.
        records: from :func:`dsft.data.files.load_records` (or built with ``Record.raw`` etc.).
        seq_len: tokens per row.

    Returns:
        Examples ``[N, seq_len]``; N is 0 for no records.

    Raises:
        UsageError: ``seq_len`` < 2, or the tokenizer has no EOS token.
        DataError: see :func:`tokenize_records`.
    """
    seqs, _ = tokenize_records(tokenizer, records, seq_len)
    return pack_examples(seqs, seq_len, pad_id(tokenizer))

