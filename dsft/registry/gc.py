"""``dsft registry gc``: remove what killed processes left behind, and nothing else.

Leftovers are: staging directories (``.<name>.<pid>-<random>.partial``, written by
:func:`dsft.atomic.staging_dir` for imports, trainings and checkpoints), ``.<name>.<pid>-trash-*``
directories of an interrupted ``registry rm`` (their rows are already gone), a ``.registry.db.<pid>.creating`` file of an
interrupted registry creation, and runs whose ``run.json`` says ``running`` while the process that
wrote it is gone. A leftover is removed only when its writer is known to be dead (its pid, recorded on
this host, no longer exists) or, when no pid is recorded, when it is older than ``min_age_s``. A run
that has a checkpoint can still be resumed (``dsft train --resume``), so it is kept unless asked.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsft.home import dsft_home

DEFAULT_MIN_AGE_S = 3600
"""Leftovers without a recorded pid are removed only past this age (an hour: no write takes that long)."""
_PID_PARTIAL = re.compile(r"^\..+\.(?P<pid>\d+)-(?:[^./]*\.partial|trash-[0-9a-f]+)$")
_CREATING = re.compile(r"^\..+\.(?P<pid>\d+)\.creating(-wal|-shm)?$")


@dataclass(frozen=True)
class Leftover:
    """One thing ``gc`` found: ``kind`` (partial, trash, creating, run), its path, and why it may go."""

    kind: str
    path: str
    reason: str
    removable: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this machine (one owned by another user counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def writer_gone(pid: int | None, host: str | None, mtime: float, *, now: float, min_age_s: float,
                alive=pid_alive) -> bool:
    """Decide whether the writer of a leftover is gone: pure but for ``alive``.

    With a pid recorded on this host, the process's absence decides (a pid reused since only keeps the
    leftover, the safe side); otherwise, only age does.
    """
    if pid is not None and (host is None or host == socket.gethostname()):
        return not alive(pid)
    return now - mtime >= min_age_s


def _mtime(p: Path) -> float:
    try:
        return p.lstat().st_mtime
    except OSError:
        return time.time()


def _hidden_entries(root: Path) -> Iterator[Path]:
    """Hidden entries of ``root`` and of its sub-directories (one level: ``<domain>/`` or ``<run>/``)."""
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            yield entry
        elif entry.is_dir() and not entry.is_symlink():
            yield from (e for e in sorted(entry.iterdir()) if e.name.startswith("."))


def _file_leftovers(root: Path, *, now: float, min_age_s: float) -> list[Leftover]:
    out = []
    for entry in _hidden_entries(root):
        m = _PID_PARTIAL.match(entry.name) or _CREATING.match(entry.name)
        if m or entry.name.endswith(".partial") or "trash-" in entry.name:
            pid = int(m.group("pid")) if m else None
            gone = writer_gone(pid, None, _mtime(entry), now=now, min_age_s=min_age_s)
            kind = "creating" if ".creating" in entry.name else "trash" if "trash-" in entry.name else "partial"
            why = (f"written by process {pid}, which is gone" if pid is not None and gone else
                   f"written by process {pid}, still running" if pid is not None else
                   f"no writer recorded; {'older' if gone else 'younger'} than {min_age_s:.0f} s")
            out.append(Leftover(kind, str(entry), why, gone))
    return out


def _run_leftovers(runs: Path, *, now: float, min_age_s: float, resumable: bool) -> list[Leftover]:
    out: list[Leftover] = []
    if not runs.is_dir():
        return out
    for d in sorted(runs.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            info = json.loads((d / "run.json").read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(info, dict) or info.get("status") != "running":
            continue
        pid = info.get("pid") if isinstance(info.get("pid"), int) else None
        if not writer_gone(pid, info.get("host"), _mtime(d / "run.json"), now=now, min_age_s=min_age_s):
            continue  # still training (or too recent to tell)
        has_checkpoint = (d / "checkpoints" / "latest.json").exists()
        if has_checkpoint and not resumable:
            out.append(Leftover("run", str(d), "unfinished run with a checkpoint: `dsft train --resume` continues it; "
                                "kept (gc --resumable removes it)", False))
        else:
            out.append(Leftover("run", str(d), "unfinished run whose process is gone" +
                                (" (its checkpoint too)" if has_checkpoint else ", no checkpoint"), True))
    return out


def find_leftovers(home: Path | None = None, *, adapters_root: Path | None = None, runs_root: Path | None = None,
                   min_age_s: float = DEFAULT_MIN_AGE_S, resumable: bool = False) -> list[Leftover]:
    """Every leftover under ``$DSFT_HOME`` (adapters, runs, the home itself), each saying whether it may go."""
    home = Path(home) if home is not None else dsft_home()
    now = time.time()
    found: list[Leftover] = []
    found += _file_leftovers(Path(adapters_root) if adapters_root is not None else home / "adapters", now=now,
                             min_age_s=min_age_s)
    runs = Path(runs_root) if runs_root is not None else home / "runs"
    found += _file_leftovers(runs, now=now, min_age_s=min_age_s)
    found += _run_leftovers(runs, now=now, min_age_s=min_age_s, resumable=resumable)
    found += [f for f in _file_leftovers(home, now=now, min_age_s=min_age_s) if f.kind == "creating"]
    return found


def remove(leftovers: list[Leftover]) -> list[Leftover]:
    """Delete the removable leftovers; returns those deleted. Links are unlinked, never followed."""
    done = []
    for f in leftovers:
        if not f.removable:
            continue
        p = Path(f.path)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        if not os.path.lexists(p):
            done.append(f)
    return done
