"""What each page shows, gathered from the registry's Python API and the adapter's own files.

No HTML here and no FastAPI: plain records, so the pages and their tests read the same data. Never imports
torch (the UI starts without loading a model).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsft.adapter_format import RECIPE_FILE
from dsft.registry import AdapterRecord, BaseRecord, CompatRecord, Registry
from dsft.registry.refs import validate_domain, validate_version

LOG_FILE = "train_log.jsonl"  # dsft.eval.logs.LOG_FILE; not imported from there to keep this module light
CARD_FILE = "README.md"
MAX_FILE_BYTES = 512 * 1024
"""Largest adapter file a page reads; a bigger one is shown as 'too large' (a page must stay quick)."""


@dataclass(frozen=True)
class VersionRow:
    """One adapter version on the front page: its record, its compatibility rows, whether it is its domain's newest."""

    record: AdapterRecord
    compat: list[CompatRecord]
    newest: bool

    def status_on_own_base(self) -> str | None:
        """The stored verdict on the base it was trained on (None: that base has no row)."""
        own = self.record.base.id if self.record.base else None
        return next((c.status for c in self.compat if c.base_id == own), None)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for c in self.compat:
            out[c.status] = out.get(c.status, 0) + 1
        return out


@dataclass(frozen=True)
class Matrix:
    """Adapter versions x base versions; a missing cell: the registry holds no row (another architecture, or a base
    that an evaluation registered, which checks only the evaluated adapter)."""

    bases: list[BaseRecord]
    rows: list[tuple[AdapterRecord, dict[str, CompatRecord]]]


@dataclass(frozen=True)
class Detail:
    """Everything the page of one adapter version shows."""

    record: AdapterRecord
    compat: list[CompatRecord]
    bases: list[BaseRecord]
    versions: list[str]
    log: list[dict[str, Any]] = field(default_factory=list)
    recipe_text: str | None = None
    card_text: str | None = None
    notes: list[str] = field(default_factory=list)
    """Files that could not be read, in words (shown on the page rather than failing it)."""


def _compat_by_ref(reg: Registry, records: list[AdapterRecord]) -> dict[str, list[CompatRecord]]:
    return {r.ref: reg.compat_rows(r.ref) for r in records}


def version_rows(reg: Registry) -> list[VersionRow]:
    """Every adapter version, by domain then version (the registry's order), with its compatibility rows."""
    records = reg.list_adapters()
    compat = _compat_by_ref(reg, records)
    newest = {r.domain: r.version for r in records}  # list_adapters orders versions ascending within a domain
    return [VersionRow(r, compat[r.ref], newest[r.domain] == r.version) for r in records]


def matrix(reg: Registry) -> Matrix:
    records = reg.list_adapters()
    compat = _compat_by_ref(reg, records)
    return Matrix(reg.list_bases(), [(r, {c.base_id: c for c in compat[r.ref]}) for r in records])


def _read_text(directory: Path, name: str, notes: list[str]) -> str | None:
    """An adapter file's text; None (with a note) when missing, a link, too large or unreadable."""
    path = directory / name
    try:
        if path.is_symlink() or not path.is_file():
            return None
        if path.stat().st_size > MAX_FILE_BYTES:
            notes.append(f"{name} is over {MAX_FILE_BYTES // 1024} KiB; not shown")
            return None
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as err:
        notes.append(f"{name} could not be read: {err.strerror or err}")
        return None


def read_log(directory: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The training log's records with a numeric loss (a damaged line is skipped, and said)."""
    text = _read_text(directory, LOG_FILE, notes)
    out: list[dict[str, Any]] = []
    bad = 0
    for line in (text or "").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict) and isinstance(rec.get("loss"), (int, float)):
            out.append(rec)
        else:
            bad += 1
    if bad:
        notes.append(f"{LOG_FILE}: {bad} line(s) skipped (not a step record)")
    return out


def detail(reg: Registry, domain: str, version: str) -> Detail:
    """The page data of ``domain@version``.

    Raises:
        UsageError: malformed domain or version (a tag is refused too). NotFoundError: no such version.
    """
    # a tag in the address would resolve silently to some version; the page's address names the version itself
    rec = reg.resolve(f"{validate_domain(domain)}@{validate_version(version)}")
    notes: list[str] = []
    directory = Path(rec.path)
    return Detail(
        record=rec, compat=reg.compat_rows(rec.ref), bases=reg.list_bases(),
        versions=[r.version for r in reg.list_adapters(rec.domain)],
        log=read_log(directory, notes), recipe_text=_read_text(directory, RECIPE_FILE, notes),
        card_text=_read_text(directory, CARD_FILE, notes), notes=notes)
