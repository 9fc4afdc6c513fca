"""Do the files on disk still match what the registry recorded? Checks only; nothing here deletes.

Layout: ``$DSFT_HOME/adapters/<domain>/<version>/`` holds the adapter's files and ``dsft_adapter.json``
(the manifest), whose ``files`` maps each relative path to its sha256. Names starting with ``.``
beside the version directories are in-flight work: ``*.partial`` (a directory being written) and
``*.trash-*`` (a directory being deleted by ``registry rm``); both are safe to delete when no dsft
process is running.
"""
from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from dsft.adapter_format import DOMAIN_RE, MANIFEST_FILE
from dsft.atomic import sha256_file, sha256_json
from dsft.errors import IntegrityError
from dsft.registry.records import AdapterRecord
from dsft.registry.refs import VERSION_RE

Kind = Literal["missing_dir", "missing", "changed", "manifest_changed", "unlisted", "orphan", "leftover"]
#: Findings that make ``verify`` fail; ``unlisted`` and ``leftover`` are reported but harmless.
PROBLEMS: frozenset[str] = frozenset({"missing_dir", "missing", "changed", "manifest_changed", "orphan"})


@dataclass(frozen=True)
class Finding:
    """One thing ``verify`` noticed: ``kind``, the adapter (if any), the path, and what it means."""

    kind: Kind
    ref: str | None
    path: str
    detail: str

    @property
    def problem(self) -> bool:
        return self.kind in PROBLEMS

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "problem": self.problem}


def manifest_sha256_matches(path: Path, expected: str) -> bool:
    """Whether ``path`` (a manifest file) is the one recorded as ``expected``.

    The recorded hash is that of the file's bytes; the canonical-JSON hash of its content is accepted
    too, since a writer may have recorded :func:`dsft.atomic.sha256_json` of the manifest dict.
    """
    if sha256_file(path) == expected:
        return True
    try:
        return sha256_json(json.loads(path.read_text())) == expected
    except (ValueError, OSError):
        return False


OWN_LOG_DIR = "tensorboard"
"""Where training writes TensorBoard events into the adapter (:data:`dsft.eval.logs.TB_DIR`; the registry
does not import dsft.eval). The manifest lists the top-level files only, so these are not hashed."""


def own_log(rel: str) -> bool:
    """Whether ``rel`` (a path inside an adapter) is a log dsft itself wrote there, not a stray file."""
    parts = rel.split("/")
    return len(parts) == 2 and parts[0] == OWN_LOG_DIR and parts[1].startswith("events.out.tfevents.")


def file_findings(rec: AdapterRecord, *, stop_at_first: bool = False,
                  hashed_when_read: Collection[str] = ()) -> list[Finding]:
    """Compare an adapter's directory with its manifest and the registry's manifest hash; the files named in
    ``hashed_when_read`` are only checked to exist (their reader verifies their sha256 as it reads them)."""
    out: list[Finding] = []
    root = Path(rec.path)
    if not root.is_dir():
        return [Finding("missing_dir", rec.ref, str(root), "adapter directory is missing; "
                        f"re-import it or remove the entry (dsft registry rm {rec.ref})")]
    mpath = root / MANIFEST_FILE
    if not mpath.is_file():
        out.append(Finding("missing", rec.ref, str(mpath), "manifest is missing"))
    elif not manifest_sha256_matches(mpath, rec.manifest_sha256):
        out.append(Finding("manifest_changed", rec.ref, str(mpath),
                           f"manifest changed since registration (sha256 recorded {rec.manifest_sha256[:12]})"))
    if stop_at_first and out:
        return out
    files: Mapping[str, str] = rec.manifest.get("files") or {}
    for rel in sorted(files):
        p = root / rel
        if not p.is_file():
            out.append(Finding("missing", rec.ref, str(p), "file is missing"))
        elif rel not in hashed_when_read:
            got = sha256_file(p)
            if got != files[rel]:
                size = p.stat().st_size
                out.append(Finding("changed", rec.ref, str(p), f"sha256 {got[:12]} differs from the recorded "
                                   f"{str(files[rel])[:12]} ({size} bytes now; changed or truncated)"))
        if stop_at_first and out:
            return out
    listed = set(files) | {MANIFEST_FILE}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in listed and not own_log(rel):
            out.append(Finding("unlisted", rec.ref, str(p), "file not listed in the manifest (not loaded, not hashed)"))
    return out


def check_files(rec: AdapterRecord, *, hashed_when_read: Collection[str] = ()) -> None:
    """Refuse an adapter whose files do not match the registry, naming the first bad file (see
    :func:`file_findings` for ``hashed_when_read``).

    Raises:
        IntegrityError: a file or the manifest is missing, changed or truncated.
    """
    bad = [f for f in file_findings(rec, stop_at_first=True, hashed_when_read=hashed_when_read) if f.problem]
    if bad:
        f = bad[0]
        raise IntegrityError(f"adapter {rec.ref}: {f.path}: {f.detail}; "
                             "restore it, or re-import / retrain the adapter")


def _explain_hidden(name: str) -> str | None:
    if ".partial" in name:
        return "staging directory of a write in progress or interrupted; `dsft registry gc` removes it once its writer is gone"
    if "trash-" in name:
        return "left by an interrupted `registry rm` (its row is gone); `dsft registry gc` removes it"
    if name.endswith(".placing"):
        return ("a registration in progress, or one killed before its commit: undone when the registry is next "
                "opened on the host that wrote it")
    return None


def orphan_findings(adapters_root: Path, known_paths: Iterable[str]) -> list[Finding]:
    """Entries under ``adapters_root`` that no registry row explains (never deleted here)."""
    if not adapters_root.is_dir():
        return []
    known = {os.path.realpath(p) for p in known_paths}
    out: list[Finding] = []
    for d in sorted(adapters_root.iterdir()):
        if d.name.startswith("."):
            why = _explain_hidden(d.name)
            out.append(Finding("leftover", None, str(d), why) if why else
                       Finding("orphan", None, str(d), "unexpected entry in the adapters directory"))
            continue
        if not d.is_dir() or not DOMAIN_RE.fullmatch(d.name):
            out.append(Finding("orphan", None, str(d), "not a domain directory; dsft did not write it"))
            continue
        for v in sorted(d.iterdir()):
            if os.path.realpath(v) in known:
                continue
            why = _explain_hidden(v.name) if v.name.startswith(".") else None
            if why:
                out.append(Finding("leftover", None, str(v), why))
            elif v.is_dir() and VERSION_RE.fullmatch(v.name):
                out.append(Finding("orphan", f"{d.name}@{v.name}", str(v),
                                   "no registry row: left by an interrupted registration (or registered in another "
                                   "registry); delete it, or move it out and `dsft registry import DIR "
                                   f"--domain {d.name}`"))
            else:
                out.append(Finding("orphan", None, str(v), "not an adapter version directory; dsft did not write it"))
    return out
