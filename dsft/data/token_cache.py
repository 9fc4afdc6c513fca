"""Tokenised examples on disk: Arrow files, memory-mapped, cached by content under ``$DSFT_HOME/cache/tokenized/``.

The key hashes the source's fingerprint, the tokenizer's (vocabulary, merges, special tokens, chat
template), ``seq_len`` and :data:`FORMAT_VERSION`; a second run with the same inputs opens the file
instead of tokenising again. Examples are written record batch by record batch while the records
stream in, and read back memory-mapped: a corpus larger than memory tokenises and trains (only the
rows of the steps are ever materialised). The file appears under its final name complete or not at all.

A source is anything with ``records()`` (an iterator of :class:`dsft.data.files.Record`) and
``fingerprint()`` (:class:`RecordSource`); :class:`RecordList` adapts a list of records.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import torch

from dsft.atomic import fsync_dir, fsync_file
from dsft.data.files import Record
from dsft.data.tokenize import TokenizeStats, encode_records
from dsft.home import dsft_home

FORMAT_VERSION = 1
"""Bump when the encoding of records changes: old cache entries are then not read."""

BATCH = 256
"""Examples per Arrow record batch (what memory holds while tokenising)."""

SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])


class RecordSource(Protocol):
    """Where records come from: a file set, a hub dataset, a generated corpus."""

    def records(self) -> Iterator[Record]: ...

    def fingerprint(self) -> str: ...


@dataclass(frozen=True)
class RecordList:
    """A :class:`RecordSource` over records already in memory; its fingerprint hashes their content."""

    items: Sequence[Record]

    def records(self) -> Iterator[Record]:
        return iter(self.items)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for r in self.items:
            fields = [r.kind, r.text, r.prompt, r.response, [(m.role, m.content) for m in r.messages or ()]]
            h.update(json.dumps(fields, ensure_ascii=False).encode())
            h.update(b"\n")
        return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of what decides token ids: the fast tokenizer's full definition, special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [type(tokenizer).__name__, backend.to_str() if backend is not None else repr(tokenizer.get_vocab()),
             getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id, getattr(tokenizer, "pad_token_id", None),
             getattr(tokenizer, "bos_token_id", None)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()


def cache_key(source: RecordSource, tokenizer: Any, seq_len: int) -> str:
    parts = [FORMAT_VERSION, source.fingerprint(), tokenizer_fingerprint(tokenizer), seq_len]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


class ArrowSequences:
    """Variable-length examples in a memory-mapped Arrow file (a :class:`dsft.data.packing.SequenceSource`)."""

    def __init__(self, path: Path):
        self.path = path
        self._table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        ids = self._table.column("input_ids")
        self._lengths = torch.cat([torch.tensor(c.value_lengths().to_numpy(zero_copy_only=False), dtype=torch.long)
                                   for c in ids.chunks]) if ids.num_chunks else torch.zeros(0, dtype=torch.long)
        meta = self._table.schema.metadata or {}
        self.stats = TokenizeStats(**json.loads(meta.get(b"dsft_stats", b"{}")))

    @property
    def lengths(self) -> torch.Tensor:
        return self._lengths

    def __len__(self) -> int:
        return self._table.num_rows

    def example(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self._table.column("input_ids")[i].values.to_numpy(zero_copy_only=False)
        labels = self._table.column("labels")[i].values.to_numpy(zero_copy_only=False)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)


def tokenized(source: RecordSource, tokenizer: Any, seq_len: int, cache_dir: Path | None = None) -> ArrowSequences:
    """The source's examples (:func:`dsft.data.tokenize.encode_records`), from the cache or tokenised into it.

    Raises:
        DataError, UsageError: as :func:`dsft.data.tokenize.encode_records`; nothing is cached then.
    """
    cache_dir = cache_dir or dsft_home() / "cache" / "tokenized"
    path = cache_dir / f"{cache_key(source, tokenizer, seq_len)}.arrow"
    if path.exists():
        return ArrowSequences(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=cache_dir)
    os.close(fd)
    try:
        stats: dict[str, Any] = {}
        with pa.OSFile(tmp, "wb") as sink:
            # the stats are known only at the end, and a file's schema (which holds them) comes first:
            # stream the batches to a spill file, then copy them into the final file (memory: one batch)
            ids: list[list[int]] = []
            labels: list[list[int]] = []
            spill = tmp + ".batches"
            with pa.OSFile(spill, "wb") as raw, pa.ipc.new_stream(raw, SCHEMA) as stream:
                for x, y in encode_records(tokenizer, source.records(), seq_len, stats):
                    ids.append(x)
                    labels.append(y)
                    if len(ids) >= BATCH:
                        stream.write_batch(pa.record_batch([ids, labels], schema=SCHEMA))
                        ids, labels = [], []
                if ids:
                    stream.write_batch(pa.record_batch([ids, labels], schema=SCHEMA))
            schema = SCHEMA.with_metadata({"dsft_stats": json.dumps(stats)})
            with pa.OSFile(spill, "rb") as src, pa.ipc.new_file(sink, schema) as writer:
                for batch in pa.ipc.open_stream(src):
                    writer.write_batch(batch)
            os.unlink(spill)
        fsync_file(tmp)  # else a power cut could leave a cache file of the right name and no content
        os.replace(tmp, path)
        fsync_dir(cache_dir)
    except BaseException:
        for p in (tmp, tmp + ".batches"):
            Path(p).unlink(missing_ok=True)
        raise
    return ArrowSequences(path)
