"""One source of user data -> a stream of records, and a content hash to cache its tokens by.

:class:`DataSource` is the stable interface between reading data and tokenising it::

    src = DataSource("qa/", split="train", fields=parse_fields(["response=answer"]))
    for record in src.records():   # an iterator: one record in memory at a time
        ...
    key = src.fingerprint()        # sha256 of the content + split + mapping: a cache key

A location is, in the order tried:

* a data file (``.jsonl .json .csv .tsv .parquet .arrow .txt``, the text types also compressed
  ``.gz .bz2 .xz``; see :mod:`dsft.data.readers`), read whole whatever the split;
* a ``datasets.save_to_disk`` directory (a ``DatasetDict``: the split's dataset);
* any other directory: its data files, recursively in name order. Files whose path names a split
  (``train.jsonl``, ``data/test-00000-of-00001.parquet``, ``validation/a.txt``) are kept only for
  that split, as ``datasets.load_dataset`` does; without split names, every file is ``train``;
* a hub dataset id (``owner/name``) in the local Hugging Face cache (``$HF_HOME/hub``), read as the
  directory of its cached snapshot. Nothing is downloaded: an id not in the cache is an error that
  says how to fetch it on a connected machine.

A shell glob that the shell did not expand (``--data 'notes/*.txt'``) is expanded by
:func:`expand_locations`.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsft.data.formats import FieldMap, to_record
from dsft.data.readers import MAX_RECORD_BYTES, READERS, first_line, open_regular, read_txt, reader_for
from dsft.data.records import Record
from dsft.errors import DataError, UsageError

FINGERPRINT_VERSION = 1
"""Bumped when the records a source yields change for the same bytes (a reader or shape change)."""

SPLIT_ALIASES = {"train": ("train", "training"), "test": ("test", "testing", "eval"),
                 "validation": ("validation", "valid", "val", "dev")}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class DataSource:
    """Where one ``--data`` comes from and how to read it.

    Attributes:
        location: a file, a directory, a ``save_to_disk`` directory or a hub dataset id (see the module).
        split: the split of a directory, saved ``DatasetDict`` or hub dataset (a single file has none).
        fields: the ``--field`` mapping, from :func:`dsft.data.formats.parse_fields` (``.txt`` files,
            one text record per paragraph, are read without it).
        max_record_bytes: the largest record accepted (a line, a CSV row, a paragraph, a table row).
    """

    location: str
    split: str = "train"
    fields: FieldMap = ()
    max_record_bytes: int = MAX_RECORD_BYTES

    def __post_init__(self) -> None:
        if not str(self.location).strip():
            raise UsageError("data.location: empty; give a data file, directory or dataset id")
        if not self.split or not re.fullmatch(r"[\w.-]+", self.split):
            raise UsageError(f"--split {self.split!r}: expected a split name such as train, test or validation")
        if self.max_record_bytes < 1:
            raise UsageError(f"data.max_record_bytes must be >= 1, got {self.max_record_bytes}")

    def records(self) -> Iterator[Record]:
        """The records, streamed: files are read line by line (row batches for Parquet and Arrow),
        datasets iterated; nothing holds a whole file (a ``.json`` array excepted, see the readers).

        Raises:
            DataError: the location cannot be found or read, or a record is malformed; one line that
                names the file and line (or row).
        """
        for name, path, dataset in self._parts():
            count = 0
            if dataset is not None:
                for i, row in enumerate(dataset, start=1):
                    count += 1
                    yield to_record(row, name, "row", i, self.fields, self.max_record_bytes)
            else:
                reader = reader_for(path)
                fields = () if reader is read_txt else self.fields  # paragraphs are text whatever the mapping
                for unit, n, obj in reader(path, name, self.max_record_bytes):
                    count += 1
                    yield to_record(obj, name, unit, n, fields, self.max_record_bytes)
            if not count:
                raise DataError(f"{name}: file is empty (no records, only blank lines or a header); "
                                "add at least one record")

    def fingerprint(self) -> str:
        """sha256 (hex) of what :meth:`records` yields from: the bytes of every file read (or each
        dataset's own fingerprint), their names, the split, the field mapping and the record bound.

        Equal fingerprints mean equal records, so tokenised data can be cached under it.
        """
        h = hashlib.sha256(json.dumps({"version": FINGERPRINT_VERSION, "split": self.split,
                                       "fields": [list(f) for f in self.fields],
                                       "max_record_bytes": self.max_record_bytes}).encode())
        for name, path, dataset in self._parts():
            h.update(b"\0" + name.encode() + b"\0")
            if dataset is not None:
                h.update(str(getattr(dataset, "_fingerprint", "")).encode())
            elif (blob := _hub_blob(path)) is not None:
                h.update(b"blob:" + blob.encode())  # hub cache blobs are named by their content hash
            else:
                with open_regular(path, name) as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
        return h.hexdigest()

    def _parts(self) -> list[tuple[str, Path, Any]]:
        """``(name, path, dataset or None)`` of each file or dataset this source reads, in order."""
        path = Path(self.location).expanduser()
        if os.path.lexists(path):
            return _local_parts(path, self.location, self.split)
        if not _HUB_ID.match(self.location) or reader_for(Path(self.location)) is not None:
            raise DataError(f"data file not found: {self.location}; check the path")
        return _local_parts(_hub_snapshot(self.location), self.location, self.split)


def _local_parts(path: Path, name: str, split: str) -> list[tuple[str, Path, Any]]:
    if not path.is_dir():
        if reader_for(path) is None:
            raise DataError(f"{name}: unsupported file type {path.suffix or '(none)'!r}; use one of "
                            f"{', '.join(READERS)} (text types also .gz, .bz2, .xz), a directory of them or a "
                            "datasets.save_to_disk directory")
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"{name}: file is empty; add at least one record")
        return [(name, path, None)]
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return [(name, path, _saved_dataset(path, name, split))]
    files = sorted(p for p in _walk(path) if reader_for(p) is not None)
    if not files:
        raise DataError(f"{name}: a directory with no data files ({', '.join(READERS)}) and not a "
                        "datasets.save_to_disk directory; pass the data files themselves")
    chosen = _split_files(files, path, name, split)
    return [(str(Path(name) / p.relative_to(path)), p, None) for p in chosen]


def _walk(root: Path) -> Iterator[Path]:
    for d, dirs, names in os.walk(root):  # links to directories are not followed: no cycles, no escapes
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for n in names:
            if not n.startswith("."):
                yield Path(d) / n


def _hub_blob(path: Path) -> str | None:
    """The content-hash name of the hub cache blob that a snapshot file links to, else None."""
    if not path.is_symlink():
        return None
    target = Path(os.readlink(path))
    return target.name if target.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{40,64}", target.name) else None


def _split_of(rel: Path) -> str | None:
    tokens = set(re.split(r"[-_./\\ ]+", str(rel.with_suffix("")).lower()))
    for split, aliases in SPLIT_ALIASES.items():
        if tokens & set(aliases):
            return split
    return None


def _split_files(files: list[Path], root: Path, name: str, split: str) -> list[Path]:
    want = next((s for s, aliases in SPLIT_ALIASES.items() if split.lower() in aliases), split.lower())
    named = {p: _split_of(p.relative_to(root)) for p in files}
    if not any(named.values()):
        if want != "train":
            raise DataError(f"{name}: no file names split {split!r} (without split names every file is 'train'); "
                            "use --split train or name the files, e.g. test.jsonl")
        return files
    chosen = [p for p, s in named.items() if s == want]
    if not chosen:
        found = sorted({s for s in named.values() if s})
        raise DataError(f"{name}: no files for split {split!r}; splits found: {', '.join(found)}; pick one with --split")
    return chosen


def _saved_dataset(path: Path, name: str, split: str) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))  # memory-mapped Arrow: rows are read as iterated
    except Exception as e:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid, ...
        raise DataError(f"{name}: cannot load the saved dataset ({first_line(e)}); save it again") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: has no split {split!r}; splits: {', '.join(sorted(ds))}; pick one with --split")
        ds = ds[split]
    return ds


def _hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot directory of a hub dataset; never downloads (``local_files_only``)."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", cache_dir=constants.HF_HUB_CACHE, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, or a malformed id the hub client refuses
        raise DataError(
            f"{repo_id}: no such file or directory, and no dataset {repo_id!r} in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}); on a connected machine run `hf download {repo_id} --repo-type dataset`, "
            "then copy its cache here or point HF_HOME at it") from None


def expand_locations(values: Sequence[str | Path]) -> list[str]:
    """``--data`` values with unexpanded shell globs (``*``, ``?``, ``[``) expanded, in name order.

    Raises:
        DataError: a glob matches nothing.
    """
    out: list[str] = []
    for v in values:
        v = str(v)
        if os.path.lexists(v) or not glob.has_magic(v):
            out.append(v)
            continue
        matches = sorted(glob.glob(os.path.expanduser(v), recursive=True))
        if not matches:
            raise DataError(f"--data {v}: the pattern matches no file; check the path")
        out.extend(matches)
    return out


def as_sources(values: Sequence[str | Path | DataSource], split: str = "train",
               fields: FieldMap = ()) -> list[DataSource]:
    """Sources for ``--data`` values (globs expanded), each read with ``split`` and ``fields``."""
    out: list[DataSource] = []
    for v in values:
        if isinstance(v, DataSource):
            out.append(v)
        else:
            out.extend(DataSource(m, split, tuple(fields)) for m in expand_locations([v]))
    return out
