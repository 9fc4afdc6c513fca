"""``dsft registry gc`` removes what killed processes left (and ``verify`` points at it), never live work."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from security_helpers import write_peft_dir

from dsft.registry.gc import writer_gone


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_writer_gone_decides_by_pid_on_this_host_else_by_age():
    import socket

    assert writer_gone(123, None, 0.0, now=10.0, min_age_s=3600, alive=lambda pid: False)
    assert not writer_gone(123, socket.gethostname(), 0.0, now=1e9, min_age_s=1, alive=lambda pid: True)
    assert not writer_gone(123, "other-host", 0.0, now=10.0, min_age_s=3600, alive=lambda pid: False)
    assert writer_gone(None, None, 0.0, now=4000.0, min_age_s=3600)


def test_gc_removes_leftovers_of_dead_processes_only(dsft, home, tmp_path):
    write_peft_dir(tmp_path / "peft")
    assert dsft("registry", "import", str(tmp_path / "peft"), "--domain", "finance").returncode == 0
    domain = home / "adapters" / "finance"
    dead, live = _dead_pid(), os.getpid()
    (domain / f".import.{dead}-abc123.partial").mkdir()
    (domain / f".new.{live}-def456.partial").mkdir()  # being written by a live process: kept
    (domain / f".0.0.9.{dead}-trash-0a1b2c3d").mkdir()
    runs = home / "runs"
    for name, pid, checkpoint in (("finance-1", dead, False), ("finance-2", dead, True), ("finance-3", live, False)):
        (runs / name / "checkpoints").mkdir(parents=True)
        (runs / name / "run.json").write_text(json.dumps({"status": "running", "pid": pid, "host": os.uname().nodename}))
        if checkpoint:
            (runs / name / "checkpoints" / "latest.json").write_text("{}")
    (home / f".registry.db.{dead}.creating").write_bytes(b"x")

    verify = dsft("registry", "verify")
    assert verify.returncode == 0 and "dsft registry gc" in verify.stdout
    proc = dsft("registry", "gc", "--json")
    assert proc.returncode == 0, proc.stderr
    removed = {os.path.basename(p) for p in json.loads(proc.stdout)["removed"]}
    assert removed == {f".import.{dead}-abc123.partial", f".0.0.9.{dead}-trash-0a1b2c3d", "finance-1",
                       f".registry.db.{dead}.creating"}
    assert (domain / f".new.{live}-def456.partial").exists() and (runs / "finance-2").exists() and (runs / "finance-3").exists()
    assert (domain / "0.1.0").is_dir() and dsft("registry", "verify").returncode == 0
    assert dsft("registry", "gc", "--resumable").returncode == 0 and not (runs / "finance-2").exists()
