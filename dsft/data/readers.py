"""Bounded, streaming readers of data files: each yields ``(unit, n, object)`` and holds one record at a time.

What a reader guarantees (issue 15): it opens regular files only (a FIFO, a device such as
``/dev/zero`` or a link to one is refused before any read), it never reads more than
``max_record_bytes`` for one record (a line, a CSV row, a paragraph), it turns nesting too deep for
the JSON parser into a :class:`DataError`, an unterminated CSV quote is an error, and text that is
not UTF-8 is reported with its line and byte offset. Every error is one line naming the file and
the line. Normalising objects into records is :mod:`dsft.data.formats`' job.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from dsft.errors import DataError

MAX_RECORD_BYTES = 10 * 2**20
"""Default bound on one record's size in the file (a line, a CSV row, a text paragraph)."""

MAX_JSON_ARRAY_BYTES = 2**30
"""A ``.json`` array is parsed whole; larger files must be JSON Lines, which stream."""

Rows = Iterator[tuple[str, int, Any]]
"""``(unit, n, object)``: unit is "line", "row" or "item", ``n`` is 1-based."""


def open_regular(path: Path, name: str) -> IO[bytes]:
    """Open ``path`` for binary reading if it is a regular file (after following links).

    Raises:
        DataError: it is missing, or a FIFO, socket or device (reading one could hang or never end).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DataError(f"data file not found: {name}; check the path") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read ({e.strerror}); check the path and its permissions") from None
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"{name}: not a regular file (a FIFO, device or socket); pass a data file")
    # O_NONBLOCK: if the path is swapped for a FIFO after the check, open() must not block on it
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DataError(f"{name}: not a regular file (a FIFO, device or socket); pass a data file")
    return os.fdopen(fd, "rb")


COMPRESSIONS: dict[str, Callable[[IO[bytes]], IO[bytes]]] = {
    ".gz": lambda f: gzip.GzipFile(fileobj=f), ".bz2": bz2.BZ2File, ".xz": lzma.LZMAFile,
}
"""Compressed text formats (``notes.jsonl.gz``), decompressed as they are read, as ``datasets`` does."""
_DECOMPRESS_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)


def open_data(path: Path, name: str) -> IO[bytes]:
    """:func:`open_regular`, decompressing ``.gz``, ``.bz2`` and ``.xz`` files on the fly."""
    f = open_regular(path, name)
    wrap = COMPRESSIONS.get(path.suffix.lower())
    return wrap(f) if wrap else f


def reader_for(path: Path) -> Callable[..., Rows] | None:
    """The reader of ``path`` by its extension (``.jsonl.gz`` reads as ``.jsonl``); None if unsupported."""
    suffix = path.suffix.lower()
    if suffix in COMPRESSIONS:
        inner = Path(path.stem).suffix.lower()
        return READERS.get(inner) if inner in TEXT_TYPES else None
    return READERS.get(suffix)


def lines(path: Path, name: str, max_bytes: int = MAX_RECORD_BYTES, keep_ends: bool = False) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line, decoded as UTF-8 (a leading BOM dropped), one at a time.

    Only ``"\\n"`` ends a line: ``str.splitlines`` would also break on U+2028, which JSON allows in strings.

    Raises:
        DataError: a line longer than ``max_bytes``, or bytes that are not UTF-8 (names the byte offset).
    """
    with open_data(path, name) as f:
        offset, n = 0, 0
        while raw := _readline(f, max_bytes + 1, name, n + 1):
            n += 1
            if len(raw) > max_bytes and not raw.endswith(b"\n"):
                raise DataError(f"{name} line {n}: longer than {max_bytes:,} bytes (the limit for one record); "
                                "split the record, or check that the file is text")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{name} line {n}: not UTF-8 text at byte {offset + e.start} ({e.reason}); "
                                "re-save the file as UTF-8") from None
            if n == 1:
                text = text.removeprefix("\ufeff")
            offset += len(raw)
            yield n, text if keep_ends else text.rstrip("\r\n")


def _readline(f: IO[bytes], limit: int, name: str, n: int) -> bytes:
    try:
        return f.readline(limit)
    except _DECOMPRESS_ERRORS as e:
        raise DataError(f"{name} line {n}: cannot decompress ({first_line(e)}); check the file") from None


def parse_json(text: str, where: str) -> Any:
    """``json.loads`` with bad JSON and too-deep nesting as one-line errors naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: bad JSON ({e.msg} at column {e.colno}); "
                        "each line must be one complete JSON object") from None
    except RecursionError:
        raise DataError(f"{where}: JSON nested too deeply to read; flatten the record") from None


def read_jsonl(path: Path, name: str, max_bytes: int = MAX_RECORD_BYTES) -> Rows:
    for i, line in lines(path, name, max_bytes):
        if line.strip():
            yield "line", i, parse_json(line, f"{name} line {i}")


def read_json(path: Path, name: str, max_bytes: int = MAX_RECORD_BYTES) -> Rows:
    """A JSON array of objects (parsed whole, up to :data:`MAX_JSON_ARRAY_BYTES`), else JSON Lines."""
    with open_data(path, name) as f:
        try:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            array = head.startswith(b"[")
            if array:
                f.seek(0)
                data = f.read(MAX_JSON_ARRAY_BYTES + 1)
        except _DECOMPRESS_ERRORS as e:
            raise DataError(f"{name}: cannot decompress ({first_line(e)}); check the file") from None
        if array and len(data) > MAX_JSON_ARRAY_BYTES:
            raise DataError(f"{name}: a JSON array over {MAX_JSON_ARRAY_BYTES:,} bytes is too large to read whole; "
                            "write it as JSON Lines (.jsonl, one object per line), which streams")
    if not array:
        yield from read_jsonl(path, name, max_bytes)
        return
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{name} line {line}: not UTF-8 text at byte {e.start} ({e.reason}); "
                        "re-save the file as UTF-8") from None
    del data
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name} line {e.lineno}: bad JSON ({e.msg} at column {e.colno}); "
                        "fix the array or write one object per line (JSON Lines)") from None
    except RecursionError:
        raise DataError(f"{name}: JSON nested too deeply to read; flatten the records") from None
    del text
    for i, obj in enumerate(items, start=1):
        yield "item", i, obj


def read_tsv(path: Path, name: str, max_bytes: int = MAX_RECORD_BYTES) -> Rows:
    """:func:`read_csv` with tab-separated cells."""
    return read_csv(path, name, max_bytes, delimiter="\t")


def read_csv(path: Path, name: str, max_bytes: int = MAX_RECORD_BYTES, delimiter: str = ",") -> Rows:
    """A header row, then one record per row; empty cells count as missing. Errors name the row's first line."""
    state = {"line": 0, "bytes": 0, "start": 1}

    def feed() -> Iterator[str]:
        for n, line in lines(path, name, max_bytes, keep_ends=True):
            state["line"] = n
            state["bytes"] += len(line)
            if state["bytes"] > max_bytes:  # a quoted cell spanning lines (often an unterminated quote)
                raise DataError(f"{name} line {state['start']}: a CSV row longer than {max_bytes:,} bytes (lines "
                                f"{state['start']}-{n}); check for an unterminated quote")
            yield line

    def next_row() -> None:
        state["start"], state["bytes"] = state["line"] + 1, 0

    reader = csv.reader(feed(), strict=True, delimiter=delimiter)  # strict: an unterminated quote is an error, not one huge cell
    try:
        header = next(reader, None)
        if header is None:
            return
        next_row()
        for row in reader:
            if len(row) > len(header):
                raise DataError(f"{name} line {state['start']}: {len(row)} cells but the header has {len(header)}; "
                                "quote cells that contain commas")
            if row:
                cells = dict(zip(header, row + [""] * (len(header) - len(row))))
                yield "line", state["start"], {k: (v if v != "" else None) for k, v in cells.items()}
            next_row()
    except csv.Error as e:
        raise DataError(f"{name} line {state['start']}: bad CSV ({e}); check the quoting") from None


def read_txt(path: Path, name: str, max_bytes: int = MAX_RECORD_BYTES) -> Rows:
    """One raw-text document per blank-line-separated paragraph."""
    para: list[str] = []
    first, size = 0, 0
    for i, line in lines(path, name, max_bytes):
        if line.strip():
            first = first or i
            para.append(line)
            size += len(line) + 1
            if size > max_bytes:
                raise DataError(f"{name} line {first}: a paragraph longer than {max_bytes:,} bytes (the limit for one "
                                "record); separate paragraphs with blank lines")
        elif para:
            yield "line", first, {"text": "\n".join(para)}
            para, first, size = [], 0, 0
    if para:
        yield "line", first, {"text": "\n".join(para)}


def read_parquet(path: Path, name: str, max_bytes: int = MAX_RECORD_BYTES) -> Rows:
    """One record per row, read a batch of rows at a time."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{name}: reading Parquet needs pyarrow; pip install pyarrow") from None
    open_regular(path, name).close()
    try:
        pf = pq.ParquetFile(path)
        batches = pf.iter_batches(batch_size=512)
        i = 0
        for batch in batches:
            for row in batch.to_pylist():
                i += 1
                yield "row", i, row
    except DataError:
        raise
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for a bad file
        raise DataError(f"{name}: not a readable Parquet file ({first_line(e)}); re-export it") from None


def read_arrow(path: Path, name: str, max_bytes: int = MAX_RECORD_BYTES) -> Rows:
    """An Arrow IPC file (stream or file format, as ``datasets`` writes them), a batch of rows at a time."""
    import pyarrow as pa

    with open_regular(path, name) as f:
        try:
            try:
                batches = iter(pa.ipc.open_stream(f))
            except pa.ArrowInvalid:
                f.seek(0)
                reader = pa.ipc.open_file(f)
                batches = (reader.get_batch(k) for k in range(reader.num_record_batches))
            i = 0
            for batch in batches:
                for row in batch.to_pylist():
                    i += 1
                    yield "row", i, row
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{name}: not a readable Arrow file ({first_line(e)}); re-export it") from None


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


READERS: dict[str, Callable[..., Rows]] = {
    ".jsonl": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
    ".tsv": read_tsv,
    ".parquet": read_parquet,
    ".arrow": read_arrow,
    ".txt": read_txt,
}
"""Extension -> reader ``(path, name, max_bytes) -> Rows``; the keys are the supported file types (the text
types may also be compressed, see :data:`COMPRESSIONS`)."""
TEXT_TYPES = (".jsonl", ".json", ".csv", ".tsv", ".txt")
