"""A registration killed between placing its directory and committing its row is undone at the next open."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from registry_helpers import fingerprint, manifest, write_adapter_files

from dsft.registry import Registry, gc, open_registry


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _killed_registration(reg: Registry, pid: int, *, committed: bool) -> Path:
    """What a process killed right after ``place_dir`` leaves (its intent, the placed directory), and with
    ``committed`` what one killed after its commit but before removing the intent leaves."""
    fp = fingerprint()
    with reg.transaction() as tx:
        base = tx.ensure_base(name="tiny", source="preset:tiny", fingerprint=fp)
        staged = reg.adapters_root / "finance" / ".x.partial"
        write_adapter_files(staged)
        final = tx.place_dir(staged, domain="finance", version="0.1.0")
        if committed:
            tx.add_adapter(domain="finance", version="0.1.0", kind="lora", path=str(final),
                           manifest=manifest("finance", "0.1.0", fp), manifest_sha256="0" * 64, base=base)
        tx._undo.clear()  # a SIGKILL runs no undo and no post-commit cleanup
        tx._after.clear()
        if not committed:
            tx.session.rollback()
    intent = final.parent / ".0.1.0.placing"
    intent.write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    return final


def test_a_directory_placed_by_a_killed_process_becomes_a_leftover_that_gc_removes(reg: Registry, registry_url) -> None:
    pid = _dead_pid()
    final = _killed_registration(reg, pid, committed=False)
    assert final.is_dir() and not reg.verify().ok  # the orphan, before anyone opens the registry again
    with open_registry(registry_url) as again:
        report = again.verify()
        assert report.ok and not final.exists(), report.to_json()
        leftover = final.parent / f".0.1.0.{pid}-unregistered.partial"
        assert leftover.is_dir() and not (final.parent / ".0.1.0.placing").exists()
        removed = gc.remove(gc.find_leftovers(adapters_root=again.adapters_root, runs_root=final.parent / "no-runs"))
        assert [r.path for r in removed] == [str(leftover)]


def test_a_killed_process_that_committed_keeps_its_adapter(reg: Registry, registry_url) -> None:
    final = _killed_registration(reg, _dead_pid(), committed=True)
    with open_registry(registry_url) as again:
        assert [a.ref for a in again.list_adapters()] == ["finance@0.1.0"] and final.is_dir()
        assert not (final.parent / ".0.1.0.placing").exists()


def test_a_live_registration_is_left_alone(reg: Registry, registry_url) -> None:
    final = _killed_registration(reg, os.getpid(), committed=False)
    with open_registry(registry_url) as again:
        assert final.is_dir() and (final.parent / ".0.1.0.placing").exists()
        kinds = {(f.kind, f.problem) for f in again.verify().findings if f.path.endswith(".placing")}
        assert kinds == {("leftover", False)}


@pytest.mark.parametrize("fails", [False, True])
def test_a_registration_that_ends_leaves_no_intent(reg: Registry, tmp_path: Path, fails: bool) -> None:
    src = tmp_path / "lora-out"
    write_adapter_files(src)
    if fails:
        with pytest.raises(RuntimeError, match="boom"), reg.transaction() as tx:
            staged = reg.adapters_root / "finance" / ".y.partial"
            write_adapter_files(staged)
            tx.place_dir(staged, domain="finance", version="0.1.0")
            raise RuntimeError("boom")
    else:
        reg.import_dir(src, domain="finance")
    assert not list(reg.adapters_root.glob("*/.*.placing"))


def test_a_removal_killed_before_its_commit_gets_its_directory_back(reg: Registry, registry_url) -> None:
    from registry_helpers import register

    rec = register(reg, "finance", fingerprint())
    home = Path(rec.path)
    with reg.transaction() as tx:  # what a SIGKILL after the rename to trash and before the commit leaves
        tx.remove_adapter(rec.ref)
        tx._undo.clear()
        tx._after.clear()
        tx.session.rollback()
    pid = _dead_pid()
    [trash] = [p for p in home.parent.iterdir() if "-trash-" in p.name]
    trash.rename(trash.with_name(f".{home.name}.{pid}-trash-{trash.name.rsplit('-', 1)[1]}"))
    assert not home.exists() and not reg.verify().ok  # registered, its files in the trash gc would delete
    with open_registry(registry_url) as again:
        assert again.verify().ok and home.is_dir() and [a.ref for a in again.list_adapters()] == [rec.ref]
        assert not [p for p in home.parent.iterdir() if "-trash-" in p.name]


def test_opening_a_registry_during_a_live_registration_does_not_wait_for_its_lock(reg: Registry, registry_url) -> None:
    import time

    with reg.transaction() as tx:  # this process holds the write lock, its intent on disk
        staged = reg.adapters_root / "finance" / ".z.partial"
        write_adapter_files(staged)
        tx.place_dir(staged, domain="finance", version="0.1.0")
        t0 = time.monotonic()
        with open_registry(registry_url) as other:
            assert other.list_adapters() == []
        assert time.monotonic() - t0 < 5  # not the lock's busy timeout
        tx.session.rollback()
