"""Read user data files into records of three kinds: raw text, instruction pairs and chats.

Supported inputs (by extension; a directory written by ``datasets.Dataset.save_to_disk`` too):

=============  ====================================================================
``.jsonl``     one JSON object per line (blank lines are skipped)
``.json``      JSON Lines as above, or one JSON array of objects
``.csv``       a header row, then one record per row; empty cells count as missing
``.parquet``   one record per row (read with pyarrow)
``.txt``       one raw-text document per blank-line-separated paragraph
=============  ====================================================================

An object becomes a record by its fields, checked in this order:

* ``messages``: a list of ``{"role": "system|user|assistant", "content": str}`` -> chat
* ``prompt`` and ``response`` (both strings) -> instruction
* ``text`` (a string) -> raw text

Other fields (ids, metadata) are ignored. Every problem is a one-line :class:`DataError` that names
the file and the line (or row) and says how to fix it; every record remembers where it came from
(``source="train.jsonl:3"``) so that later stages can point at it too.
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dsft.errors import DataError

Kind = Literal["text", "instruction", "chat"]
ROLES = ("system", "user", "assistant")
KNOWN_FIELDS = "text / prompt+response / messages"


@dataclass(frozen=True)
class Message:
    """One turn of a chat."""

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class Record:
    """One normalised training record; only the fields of its ``kind`` are set.

    ``source`` is ``"<file>:<n>"``: the line for JSONL/CSV/text files (a paragraph's first line),
    the 1-based row for Parquet and ``save_to_disk`` directories, the item for a JSON array.
    """

    kind: Kind
    text: str | None = None
    prompt: str | None = None
    response: str | None = None
    messages: tuple[Message, ...] | None = None
    source: str = "<memory>"

    @staticmethod
    def raw(text: str, source: str = "<memory>") -> Record:
        return Record("text", text=text, source=source)

    @staticmethod
    def instruction(prompt: str, response: str, source: str = "<memory>") -> Record:
        return Record("instruction", prompt=prompt, response=response, source=source)

    @staticmethod
    def chat(messages: Sequence[Mapping[str, str] | Message], source: str = "<memory>") -> Record:
        turns = tuple(m if isinstance(m, Message) else Message(m["role"], m["content"]) for m in messages)
        return Record("chat", messages=turns, source=source)

    def chat_dicts(self) -> list[dict[str, str]]:
        """The messages as ``[{"role", "content"}, ...]``, the form chat templates take."""
        return [{"role": m.role, "content": m.content} for m in self.messages or ()]


def load_records(paths: Sequence[str | Path]) -> list[Record]:
    """Load and normalise the records of every file, in order.

    Args:
        paths: data files (see the module docstring for the formats) or ``save_to_disk`` directories.

    Returns:
        The records of all files, in file order then line order.

    Raises:
        DataError: a file is missing, empty, unreadable, of an unsupported type, or has a record
            that is not one of the three kinds; the message names the file and line or row.
    """
    records: list[Record] = []
    for p in paths:
        records.extend(_load_one(Path(p)))
    return records


def to_record(obj: Any, name: str, unit: str, n: int) -> Record:
    """Normalise one parsed object found at ``unit n`` (e.g. "line 3") of the file ``name``.

    Args:
        obj: the parsed JSON object, CSV row or table row.
        name: the file as the user named it; unit: "line", "row" or "item"; n: 1-based position.

    Returns:
        The record, with ``source="{name}:{n}"``.

    Raises:
        DataError: the object is not one of the three record kinds, or a field has the wrong type.
    """
    where = f"{name} {unit} {n}"
    source = f"{name}:{n}"
    if not isinstance(obj, Mapping):
        raise DataError(f"{where}: expected an object with {KNOWN_FIELDS}, got {_kind_of(obj)}")
    present = {k for k, v in obj.items() if v is not None}
    if "messages" in present:
        return Record("chat", messages=_messages(obj["messages"], where), source=source)
    if "prompt" in present or "response" in present:
        for key, other in (("prompt", "response"), ("response", "prompt")):
            if key not in present:
                raise DataError(f"{where}: has {other} but no {key}; an instruction record needs both")
        prompt, response = _string(obj, "prompt", where), _string(obj, "response", where)
        if not response.strip():
            raise DataError(f"{where}: response is empty; nothing to learn from, fill it in or drop the record")
        return Record("instruction", prompt=prompt, response=response, source=source)
    if "text" in present:
        text = _string(obj, "text", where)
        if not text.strip():
            raise DataError(f"{where}: text is empty; fill it in or drop the record")
        return Record("text", text=text, source=source)
    empty = [k for k in ("messages", "prompt", "response", "text") if k in obj]
    if empty:
        raise DataError(f"{where}: {empty[0]} is empty; fill it in or drop the record")
    raise DataError(f"{where}: record has none of {KNOWN_FIELDS}; got keys {sorted(map(str, obj))}")


def _string(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key} must be a string, got {_kind_of(value)} {_short(value)}")
    return value


def _messages(value: Any, where: str) -> tuple[Message, ...]:
    if isinstance(value, str):  # CSV and some Parquet exports store the list as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: messages is a string but not a JSON list ({e.msg}); store it as a list") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: messages must be a non-empty list of {{role, content}}, got {_short(value)}")
    turns = []
    for i, m in enumerate(value):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise DataError(f"{at} must be an object with role and content, got {_short(m)}")
        if m["role"] not in ROLES:
            raise DataError(f"{at}.role {m['role']!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise DataError(f"{at}.content must be a string, got {_kind_of(m['content'])} {_short(m['content'])}")
        turns.append(Message(m["role"], m["content"]))
    if not any(t.role == "assistant" for t in turns):
        raise DataError(f"{where}: messages has no assistant turn; the loss is on assistant turns, so add one")
    return tuple(turns)


def _kind_of(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}.get(
        type(value), type(value).__name__)


def _short(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- readers: each yields (unit, n, object) and leaves normalising to to_record ---------------

Rows = Iterator[tuple[str, int, Any]]


def _load_one(path: Path) -> list[Record]:
    name = str(path)
    if not path.exists():
        raise DataError(f"data file not found: {name}; check the path")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{name}: file is empty; add at least one record")
    if path.is_dir():
        rows = _read_saved_dataset(path, name)
    else:
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            supported = ", ".join(READERS)
            raise DataError(f"{name}: unsupported file type {path.suffix or '(none)'!r}; use one of {supported} "
                            "or a datasets.save_to_disk directory")
        rows = reader(path, name)
    records = [to_record(obj, name, unit, n) for unit, n, obj in rows]
    if not records:
        raise DataError(f"{name}: file is empty (no records, only blank lines or a header); add at least one record")
    return records


def _read_text(path: Path, name: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{name} line {line}: not UTF-8 text ({e.reason}); re-save the file as UTF-8") from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    # split on "\n" only: str.splitlines would also break on U+2028, which JSON allows inside strings
    for i, line in enumerate(text.split("\n"), start=1):
        yield i, line.rstrip("\r")


def _read_jsonl(path: Path, name: str) -> Rows:
    for i, line in _lines(_read_text(path, name)):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name} line {i}: bad JSON ({e.msg} at column {e.colno}); "
                            "each line must be one complete JSON object") from None
        yield "line", i, obj


def _read_json(path: Path, name: str) -> Rows:
    text = _read_text(path, name)
    if not text.lstrip().startswith("["):
        yield from _read_jsonl(path, name)
        return
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{name} line {e.lineno}: bad JSON ({e.msg} at column {e.colno}); "
                        "fix the array or write one object per line (JSON Lines)") from None
    for i, obj in enumerate(items, start=1):
        yield "item", i, obj


def _read_csv(path: Path, name: str) -> Rows:
    reader = csv.DictReader(io.StringIO(_read_text(path, name), newline=""))
    if reader.fieldnames is None:
        return
    start = reader.line_num + 1
    try:
        for row in reader:
            if None in row:
                raise DataError(f"{name} line {start}: {len(row[None]) + len(reader.fieldnames)} cells but the header "
                                f"has {len(reader.fieldnames)}; quote cells that contain commas")
            yield "line", start, {k: (v if v != "" else None) for k, v in row.items()}
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{name} line {reader.line_num}: bad CSV ({e}); check the quoting") from None


def _read_txt(path: Path, name: str) -> Rows:
    para: list[str] = []
    first = 0
    for i, line in _lines(_read_text(path, name)):
        if line.strip():
            first = first or i
            para.append(line)
        elif para:
            yield "line", first, {"text": "\n".join(para)}
            para, first = [], 0
    if para:
        yield "line", first, {"text": "\n".join(para)}


def _read_parquet(path: Path, name: str) -> Rows:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{name}: reading Parquet needs pyarrow; pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError) for a bad file
        raise DataError(f"{name}: not a readable Parquet file ({_first_line(e)}); re-export it") from None
    for i, row in enumerate(table.to_pylist(), start=1):
        yield "row", i, row


def _read_saved_dataset(path: Path, name: str) -> Rows:
    if (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").exists())
        example = f", e.g. {path / splits[0]}" if splits else ""
        raise DataError(f"{name}: is a DatasetDict with splits {splits}; pass one split's directory{example}")
    if not ((path / "state.json").exists() or (path / "dataset_info.json").exists()):
        raise DataError(f"{name}: is a directory but not a datasets save_to_disk directory (no state.json); "
                        "pass the data files themselves")
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid, ...
        raise DataError(f"{name}: cannot load the saved dataset ({_first_line(e)}); save it again") from None
    for i, row in enumerate(ds, start=1):
        yield "row", i, row


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


READERS: dict[str, Callable[[Path, str], Rows]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".parquet": _read_parquet,
    ".txt": _read_txt,
}
"""Extension -> reader; the keys are the supported file types."""
