"""The user's own data for one run: what trains (by source) and what is held out to measure it.

Here, below ``recipes/`` and ``eval/``, because training mixes it and evaluation rebuilds its held-out set.

Two sources hold user data: ``domain.user`` (the files of ``dsft domains new NAME --data``, recorded in
the pack) and ``user`` (``dsft train --data``). Unless ``--eval-data`` names a held-out file, a
deterministic share of them (:func:`dsft.data.split.split_heldout`) is held out and never trains.
When user data exists it replaces the pack's generated template text in the default mixture
(:func:`dsft.recipes.sources.phase_weights`), unless the run asks for generated text too (issue 20.1).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsft.data.files import Record, load_records
from dsft.data.split import overlap, split_heldout

USER_SOURCES = ("domain.user", "user")
"""The sources that hold the user's records, in the order their shares are listed."""
GENERATED_SOURCES = ("domain.raw", "domain.instruct", "domain.longtail")
"""The pack's generated template text."""


@dataclass(frozen=True)
class UserData:
    """The user's training records by source, the held-out records, and what the held-out set is."""

    sources: dict[str, tuple[Record, ...]] = field(default_factory=dict)
    """Non-empty sources only: ``domain.user`` and/or ``user``."""
    heldout: tuple[Record, ...] = ()
    heldout_from: str = ""
    """Where the held-out records come from: ``split`` (of the user's data) or the ``--eval-data`` files."""
    overlap: int = 0
    """Held-out records (from ``--eval-data``) whose content is also a training record."""
    keep_generated: bool = False
    """Train on the pack's generated text too, beside the user's data."""
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """The files read: ``domain_files``, ``data_files`` and ``eval_data`` (absolute paths)."""

    def __bool__(self) -> bool:
        return bool(self.sources)

    def records(self, source: str) -> list[Record]:
        return list(self.sources.get(source, ()))

    @property
    def heldout_name(self) -> str:
        """How reports name the held-out set: ``user held-out (n records)``."""
        return f"user held-out ({len(self.heldout)} records)"

    def describe(self) -> dict[str, Any]:
        """The data plan's user part, for metrics and ``--json``."""
        return {"train_records": {k: len(v) for k, v in self.sources.items()}, "heldout_records": len(self.heldout),
                "heldout_from": self.heldout_from, "overlap": self.overlap, "generated_text": self.keep_generated,
                "files": {k: list(v) for k, v in self.files.items()}}


def _where(source: Any) -> str:
    """How a run records a data source: a DataSource's location (a hub id stays an id), a path made absolute."""
    location = getattr(source, "location", None)
    if location is not None:
        path = Path(location).expanduser()
        return str(path.resolve()) if path.exists() else str(location)
    return str(Path(source).resolve())


def load_user_data(domain_files: Sequence[Any], data_files: Sequence[Any], eval_data: Sequence[Any] = (),
                   keep_generated: bool = False, heldout: bool = True) -> UserData:
    """Read the domain's data files and ``--data`` files; hold out a split, or read ``--eval-data``.

    Evaluation calls it again with the files a run recorded (:meth:`UserData.describe`) to rebuild the
    same held-out set: the split is a pure function of the records.

    Args:
        domain_files: the domain pack's ``data_files`` (source ``domain.user``).
        data_files: the ``--data`` files (``user``).
        eval_data: held-out files; when given, nothing is split off the training data.
        keep_generated: also train on the pack's generated text when user data exists.
        heldout: False keeps every record for training (no split), e.g. when the user turned it off.

    Returns:
        UserData; empty (falsy) when there is no user data.

    Raises:
        DataError: an unreadable or malformed file (naming the file and line).
    """
    raw = {"domain.user": load_records(list(domain_files)) if domain_files else [],
           "user": load_records(list(data_files)) if data_files else []}
    given = load_records(list(eval_data)) if eval_data else []
    sources: dict[str, tuple[Record, ...]] = {}
    held: list[Record] = []
    for name in USER_SOURCES:
        if not raw[name]:
            continue
        if given or not heldout:
            sources[name] = tuple(raw[name])
        else:
            split = split_heldout(raw[name])
            sources[name], held = split.train, held + list(split.heldout)
    files = {"domain_files": tuple(_where(p) for p in domain_files),
             "data_files": tuple(_where(p) for p in data_files),
             "eval_data": tuple(_where(p) for p in eval_data)}
    if given:
        train = [r for records in sources.values() for r in records]
        return UserData(sources, tuple(given), "--eval-data " + " ".join(_where(p) for p in eval_data), overlap(given, train),
                        keep_generated, files)
    return UserData(sources, tuple(held), "split" if held else "", 0, keep_generated, files)


def rebuild_heldout(described: dict[str, Any]) -> tuple[Record, ...]:
    """The held-out records of a past run from its :meth:`UserData.describe` (in the adapter's metrics).

    Raises:
        DataError: a file of that run is gone or changed shape (the message names it).
    """
    files = described.get("files") or {}
    return load_user_data(files.get("domain_files", ()), files.get("data_files", ()), files.get("eval_data", ())).heldout

