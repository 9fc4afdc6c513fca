"""Records -> token tensors: raw text is packed into full blocks, instructions and chats are encoded one by one.

Every example is ``seq_len`` tokens with three rows of the same shape:

* ``input_ids``: token ids, right-padded with the tokenizer's pad id (EOS when it has none);
* ``labels``: the targets *before* the shift (the training loop shifts by one); ``-100`` where no
  loss is taken: padding, prompts, system and user turns;
* ``attention_mask``: 1 on real tokens, 0 on padding.

The tokenizer is anything shaped like ``transformers.PreTrainedTokenizerFast``: callable on a
list of texts, with ``eos_token_id`` and ``pad_token_id`` (and ``apply_chat_template`` for chats).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dsft.data.files import Record
from dsft.data.prompt import IGNORE, encode_chat, encode_instruction
from dsft.data.prompt import check_seq_len as _check_seq_len
from dsft.data.prompt import encode_texts as _encode_batch
from dsft.data.prompt import eos_id as _eos_id
from dsft.data.prompt import pad_id as _pad_id
from dsft.errors import DataError

log = logging.getLogger("dsft.data")

__all__ = ["IGNORE", "Examples", "build_examples", "collate", "count_tokens", "encode_chat", "encode_instruction",
           "pack_texts"]
# encode_instruction / encode_chat live in dsft.data.prompt: serving renders prompts with the same code.


@dataclass(frozen=True)
class Examples:
    """A set of tokenised examples, all ``[N, seq_len]`` long tensors; a map-style torch Dataset."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor

    def __post_init__(self) -> None:
        shapes = {tuple(t.shape) for t in (self.input_ids, self.labels, self.attention_mask)}
        if len(shapes) != 1 or self.input_ids.dim() != 2:
            raise ValueError(f"input_ids, labels and attention_mask must share one [N, seq_len] shape, got {shapes}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "attention_mask": self.attention_mask[i]}

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def select(self, index: torch.Tensor | Sequence[int]) -> Examples:
        """The examples at ``index`` (repeats allowed), in that order."""
        index = torch.as_tensor(index, dtype=torch.long)
        return Examples(self.input_ids[index], self.labels[index], self.attention_mask[index])

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "labels": self.labels, "attention_mask": self.attention_mask}

    @staticmethod
    def from_dict(tensors: Mapping[str, Any]) -> Examples:
        return Examples(*(torch.as_tensor(tensors[k], dtype=torch.long)
                          for k in ("input_ids", "labels", "attention_mask")))

    @staticmethod
    def empty(seq_len: int) -> Examples:
        return Examples(*(torch.zeros((0, seq_len), dtype=torch.long) for _ in range(3)))

    @staticmethod
    def cat(parts: Sequence[Examples], seq_len: int | None = None) -> Examples:
        """Concatenate along the example axis; ``seq_len`` is needed only when ``parts`` is empty."""
        if not parts:
            if seq_len is None:
                raise ValueError("Examples.cat of no parts needs seq_len")
            return Examples.empty(seq_len)
        lens = {p.seq_len for p in parts}
        if len(lens) != 1:
            raise ValueError(f"cannot concatenate examples of different seq_len {sorted(lens)}")
        return Examples(*(torch.cat([getattr(p, k) for p in parts])
                          for k in ("input_ids", "labels", "attention_mask")))


def count_tokens(examples: Examples | Mapping[str, torch.Tensor]) -> int:
    """Tokens that take loss once the training loop shifts labels by one (the first column never does)."""
    labels = examples.labels if isinstance(examples, Examples) else torch.as_tensor(examples["labels"])
    return int((labels[:, 1:] != IGNORE).sum())


def collate(batch: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack ``Examples[i]`` items into a batch; ``DataLoader(examples, batch_size=8, collate_fn=collate)``."""
    return {k: torch.stack([item[k] for item in batch]) for k in ("input_ids", "labels", "attention_mask")}


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
        return _pad_rows([(stream, stream)], seq_len, _pad_id(tokenizer)) if stream else Examples.empty(seq_len)
    ids = torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)
    return Examples(ids, ids.clone(), torch.ones_like(ids))


# --- records -> examples ---------------------------------------------------------------------------


def build_examples(tokenizer: Any, records: Sequence[Record], seq_len: int) -> Examples:
    """Tokenise records: raw texts packed together into full blocks first, then one example per
    instruction or chat record, right-padded to ``seq_len``.

    An instruction or chat whose prompt fills all of ``seq_len`` (no response token left) would
    train nothing; it is dropped with a warning on the ``dsft.data`` logger.

    Args:
        tokenizer: a Hugging Face tokenizer with an EOS token.
        records: from :func:`dsft.data.files.load_records` (or built with ``Record.raw`` etc.).
        seq_len: tokens per example.

    Returns:
        Examples ``[N, seq_len]``; N is 0 for no records.

    Raises:
        UsageError: ``seq_len`` < 2, or the tokenizer has no EOS token.
        DataError: a chat cannot be rendered (names the record's source), or no instruction/chat
            record has a response token within ``seq_len`` and there is no raw text.
    """
    _check_seq_len(seq_len)
    texts = [r.text for r in records if r.kind == "text"]
    parts = [_pack(tokenizer, texts, seq_len)] if texts else []
    rows: list[tuple[list[int], list[int]]] = []
    dropped: list[str] = []
    for r in records:
        if r.kind == "text":
            continue
        try:
            if r.kind == "instruction":
                ids, labels = encode_instruction(tokenizer, r.prompt, r.response, seq_len)
            else:
                ids, labels = encode_chat(tokenizer, r.messages, seq_len)
        except DataError as e:
            raise DataError(f"{r.source}: {e}") from None
        if all(x == IGNORE for x in labels):
            dropped.append(r.source)
        else:
            rows.append((ids, labels))
    if dropped:
        if not rows and not texts:
            raise DataError(f"{dropped[0]}: no record has a response token within seq_len={seq_len} "
                            f"({len(dropped)} prompt(s) too long); raise seq_len or shorten the prompts")
        log.warning("dropped %d record(s) whose prompt fills seq_len=%d (first: %s); raise seq_len to keep them",
                    len(dropped), seq_len, dropped[0])
    if rows:
        parts.append(_pad_rows(rows, seq_len, _pad_id(tokenizer)))
    return Examples.cat(parts, seq_len)


def _pad_rows(rows: Sequence[tuple[list[int], list[int]]], seq_len: int, pad: int) -> Examples:
    n = len(rows)
    ids = torch.full((n, seq_len), pad, dtype=torch.long)
    labels = torch.full((n, seq_len), IGNORE, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        ids[i, : len(x)] = torch.tensor(x[:seq_len], dtype=torch.long)
        labels[i, : len(y)] = torch.tensor(y[:seq_len], dtype=torch.long)
        mask[i, : len(x)] = 1
    return Examples(ids, labels, mask)
