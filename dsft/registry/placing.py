"""Placing an adapter directory so that a SIGKILL cannot leave one the registry does not know.

A registration renames its staged directory to ``adapters/<domain>/<version>`` and then commits the row
(:meth:`dsft.registry.transaction.Transaction.place_dir`). A process killed between the two leaves a
version directory without a row, which ``verify`` must call an orphan. So before the rename the writer
records its intent, ``adapters/<domain>/.<version>.placing`` ({pid, host}), and removes it once the row is
committed (or the rename is undone). :func:`recover`, run when a registry is opened, finishes what a dead
writer left: with the row committed, only the intent goes; without it, the directory is renamed to a
leftover (``.<version>.<pid>-unregistered.partial``) that ``dsft registry gc`` removes.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

from dsft.atomic import fsync_dir, write_json_atomic
from dsft.registry import repository as repo

log = logging.getLogger("dsft.registry")

SUFFIX = ".placing"


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
    """Intents left in ``adapters_root`` (a live registration's, or a killed one's)."""
    return sorted(adapters_root.glob(f"*/.*{SUFFIX}")) if adapters_root.is_dir() else []


def recover(reg: Any, alive=None) -> list[str]:
    """Finish the registrations whose writer died between placing a directory and committing its row.

    Takes the registry's write lock (no live registration is then between its rename and its commit),
    and leaves alone the intents of live processes and of other hosts. Returns what it did, one line each.
    """
    from dsft.registry.gc import pid_alive

    alive = alive or pid_alive
    intents = pending(reg.adapters_root)
    if not intents:
        return []
    done = []
    with reg.transaction() as tx:
        for intent in intents:
            try:
                who = json.loads(intent.read_text())
                pid, host = int(who["pid"]), str(who["host"])
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being written (it is written atomically: only a stray file can be unreadable)
            if host != socket.gethostname() or alive(pid):
                continue
            domain, version = intent.parent.name, intent.name[1 : -len(SUFFIX)]
            final = intent.parent / version
            if repo.get_adapter(tx.session, domain, version) is None and final.exists():
                leftover = intent.parent / f".{version}.{pid}-unregistered.partial"
                os.rename(final, leftover)
                fsync_dir(intent.parent)
                done.append(f"{domain}@{version}: process {pid} died before registering it; moved to {leftover.name}")
            intent.unlink(missing_ok=True)
    for line in done:
        log.warning("registry recovery: %s", line)
    return done
