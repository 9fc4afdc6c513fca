"""Directory moves that a SIGKILL before the commit must not leave half done, and their recovery.

A registration renames its staged directory to ``adapters/<domain>/<version>`` and then commits the row
(:meth:`dsft.registry.transaction.Transaction.place_dir`). A process killed between the two leaves a
version directory without a row, which ``verify`` must call an orphan. So before the rename the writer
records its intent, ``adapters/<domain>/.<version>.placing`` ({pid, host}), and removes it once the row is
committed (or the rename is undone). A removal (``registry rm``) renames the directory to a trash name
``.<version>.<pid>-trash-<hex>`` and then commits the row's deletion: killed between the two, the row is
still there and its files are in the trash, where ``gc`` would delete them.

:func:`recover`, run when a registry is opened (and by ``dsft registry gc`` first), finishes what a dead
writer left: a placed directory whose row was committed keeps it (only the intent goes), one whose row was
not becomes a leftover (``.<version>.<pid>-unregistered.partial``) that ``gc`` removes; a trash directory
whose row is still registered is renamed back.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

from dsft.atomic import fsync_dir, write_json_atomic
from dsft.registry import repository as repo
from dsft.registry.paths import from_stored

log = logging.getLogger("dsft.registry")

SUFFIX = ".placing"
_TRASH = re.compile(r"^\.(?P<version>.+)\.(?P<pid>\d+)-trash-[0-9a-f]+$")


def intent_path(final: Path) -> Path:
    """Where the intent to place ``final`` (``adapters/<domain>/<version>``) is recorded."""
    return final.parent / f".{final.name}{SUFFIX}"


def record_intent(final: Path) -> Path:
    """Write (durably) that this process is about to place ``final``; returns the intent's path."""
    path = intent_path(final)
    write_json_atomic(path, {"pid": os.getpid(), "host": socket.gethostname()})
    fsync_dir(path.parent)
    return path


def pending(adapters_root: Path) -> list[Path]:
    """Intents and trash directories in ``adapters_root`` (a live writer's, or a killed one's)."""
    if not adapters_root.is_dir():
        return []
    return sorted(p for p in adapters_root.glob("*/.*") if p.name.endswith(SUFFIX) or _TRASH.match(p.name))


def recover(reg: Any, alive=None) -> list[str]:
    """Finish the registrations and removals whose writer died between moving a directory and the commit.

    Takes the registry's write lock (no live writer is then between its move and its commit), and leaves
    alone the entries of live processes and the intents of other hosts. Returns what it did, one line each.
    """
    from dsft.registry.gc import pid_alive

    alive = alive or pid_alive
    # Only a dead writer's entries need the lock: a live writer's (this process's too, which may hold the
    # lock itself) are left without waiting for it.
    if not any(_writer_dead(entry, alive) for entry in pending(reg.adapters_root)):
        return []
    done = []
    with reg.transaction() as tx:
        for entry in pending(reg.adapters_root):
            line = _rm_back(tx, entry, alive) if _TRASH.match(entry.name) else _placed(tx, entry, alive)
            if line:
                done.append(line)
    for line in done:
        log.warning("registry recovery: %s", line)
    return done


def _intent_writer(intent: Path) -> int | None:
    """The pid of an intent written on this host (None: unreadable, or another host's to judge)."""
    try:
        who = json.loads(intent.read_text())
        pid, host = int(who["pid"]), str(who["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # written atomically: only a stray file can be unreadable
    return pid if host == socket.gethostname() else None


def _writer_dead(entry: Path, alive) -> bool:
    m = _TRASH.match(entry.name)
    pid = int(m.group("pid")) if m else _intent_writer(entry)
    return pid is not None and not alive(pid)


def _placed(tx: Any, intent: Path, alive) -> str | None:
    pid = _intent_writer(intent)
    if pid is None or alive(pid):
        return None
    domain, version = intent.parent.name, intent.name[1 : -len(SUFFIX)]
    final = intent.parent / version
    line = None
    if repo.get_adapter(tx.session, domain, version) is None and final.exists():
        leftover = intent.parent / f".{version}.{pid}-unregistered.partial"
        os.rename(final, leftover)
        fsync_dir(intent.parent)
        line = f"{domain}@{version}: process {pid} died before registering it; moved to {leftover.name}"
    intent.unlink(missing_ok=True)
    return line


def _rm_back(tx: Any, trash: Path, alive) -> str | None:
    m = _TRASH.match(trash.name)
    assert m is not None
    pid, version, domain = int(m.group("pid")), m.group("version"), trash.parent.name
    row = None if alive(pid) else repo.get_adapter(tx.session, domain, version)
    home = trash.parent / version
    if row is None or home.exists() or os.path.realpath(from_stored(row.path)) != os.path.realpath(home):
        return None  # a live removal, or one that committed: gc's to delete
    os.rename(trash, home)
    fsync_dir(trash.parent)
    return f"{domain}@{version}: process {pid} died before removing it; its directory is back"
