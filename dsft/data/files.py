"""Read user data into records of three kinds: raw text, instruction pairs and chats.

The pieces (each its own module):

* :mod:`dsft.data.records`: :class:`Record` and :class:`Message`, what every reader produces;
* :mod:`dsft.data.readers`: bounded, streaming readers of ``.jsonl .json .csv .parquet .txt``;
* :mod:`dsft.data.formats`: which fields make which record (text, prompt/response, Alpaca,
  OpenAI messages with tool turns, ShareGPT) and the ``--field`` column mapping;
* :mod:`dsft.data.source`: :class:`DataSource`, one file, directory, saved dataset or cached hub
  dataset, with ``.records()`` (a stream) and ``.fingerprint()`` (a cache key).

Every problem is a one-line :class:`DataError` that names the file and the line (or row) and says
how to fix it; every record remembers where it came from (``source="train.jsonl:3"``) so that later
stages can point at it too.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dsft.data.formats import SHAPES, FieldMap, parse_fields, to_record
from dsft.data.readers import READERS
from dsft.data.records import ROLES, Kind, Message, Record
from dsft.data.source import DataSource, as_sources

KNOWN_FIELDS = SHAPES

__all__ = ["KNOWN_FIELDS", "READERS", "ROLES", "DataSource", "Kind", "Message", "Record", "as_sources", "load_records",
           "parse_fields", "to_record"]


def load_records(paths: Sequence[str | Path | DataSource], split: str = "train", fields: FieldMap = ()) -> list[Record]:
    """Load and normalise the records of every source, in order, into one list.

    For data larger than memory, iterate :meth:`DataSource.records` instead.

    Args:
        paths: data files, directories, ``save_to_disk`` directories, cached hub dataset ids, or
            :class:`DataSource` objects (see :mod:`dsft.data.source`).
        split: the split to read where a source has splits.
        fields: the ``--field`` mapping (:func:`parse_fields`).

    Returns:
        The records of all sources, in source order then line order.

    Raises:
        DataError: a source is missing, empty, unreadable, of an unsupported type, or has a record
            of no known shape; the message names the file and line or row.
    """
    return [r for src in as_sources(paths, split, fields) for r in src.records()]
