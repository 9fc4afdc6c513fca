"""User data: files -> records -> token examples -> a weighted mixture.

::

    from dsft.data import load_records, build_examples, mix

    records = load_records(["notes.txt", "qa.jsonl"])           # DataError names file:line on bad input
    src = DataSource("qa/", split="train", fields=parse_fields(["response=answer"]))
    stream, cache_key = src.records(), src.fingerprint()      # an iterator of records; a content hash
    examples = build_examples(tokenizer, records, seq_len=512)  # packed rows: input_ids / labels / attention_mask / position_ids
    mixed, realised = mix({"user": examples, "general": general}, {"user": 3, "general": 1}, 1000, seed=0)
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from dsft.data.files import READERS, DataSource, Message, Record, load_records, parse_fields, to_record

if TYPE_CHECKING:
    from dsft.data.mixture import Source, apportion, mix  # noqa: F401 (exported through _LAZY)
    from dsft.data.prompt import encode_prompt  # noqa: F401
    from dsft.data.tokenize import (  # noqa: F401 (exported through _LAZY)
        IGNORE,
        Examples,
        build_examples,
        collate,
        count_tokens,
        encode_chat,
        encode_instruction,
        encode_records,
        pack_texts,
        tokenize_records,
    )

# Lazy: reading and checking data files must not pay for importing torch.
_LAZY = {
    **{name: "dsft.data.tokenize" for name in (
        "IGNORE", "Examples", "build_examples", "collate", "count_tokens", "encode_chat", "encode_instruction",
        "encode_records", "pack_texts", "tokenize_records")},
    **{name: "dsft.data.mixture" for name in ("Source", "apportion", "mix")},
    "encode_prompt": "dsft.data.prompt",
}

__all__ = ["READERS", "DataSource", "Message", "Record", "load_records", "parse_fields", "to_record", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dsft.data' has no attribute {name!r}")
