"""Fault test: ``dsft train`` and ``dsft registry import`` killed (SIGKILL) at random points leave a registry
that verifies clean, with nothing half-registered: every row's files match, no version directory without a row."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from security_helpers import write_peft_dir

IMPORT_KILLS = 3
TRAIN_KILLS = 1  # a train is the slow one: one kill, somewhere between start-up and saving


def _start(home, *args: str) -> subprocess.Popen:
    env = {**os.environ, "DSFT_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "dsft.cli", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _kill_after(proc: subprocess.Popen, delay: float) -> None:
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_kills_during_import_and_train_leave_a_clean_registry(dsft, home, tmp_path):
    rng = random.Random(int(os.environ.get("DSFT_KILL_SEED", "15")))
    src = tmp_path / "peft"
    write_peft_dir(src)
    for _ in range(IMPORT_KILLS):  # the CLI needs ~1-3 s to import and open the registry: kill across that window
        _kill_after(_start(home, "registry", "import", str(src), "--domain", "finance"), rng.uniform(0.5, 3.0))
    for _ in range(TRAIN_KILLS):
        _kill_after(_start(home, "train", "--max-steps", "1", "--quiet"), rng.uniform(2.0, 8.0))

    verify = dsft("registry", "verify", "--json")
    report = json.loads(verify.stdout)
    assert verify.returncode == 0 and [f for f in report["findings"] if f["problem"]] == [], verify.stdout
    listed = json.loads(dsft("registry", "list", "--json").stdout)
    registered = {os.path.realpath(a["path"]) for a in listed}
    on_disk = {os.path.realpath(v) for v in (home / "adapters").glob("*/*") if not v.name.startswith(".")} \
        if (home / "adapters").exists() else set()
    assert on_disk == registered  # no version directory without its row, no row without its directory
    for a in listed:
        assert dsft("registry", "show", f"{a['domain']}@{a['version']}").returncode == 0
    # gc removes every leftover of the killed processes
    assert dsft("registry", "gc").returncode == 0
    after = json.loads(dsft("registry", "verify", "--json").stdout)
    assert [f for f in after["findings"] if f["kind"] == "leftover"] == [], after
    assert not [r for r in (home / "runs").glob("*/run.json") if json.loads(r.read_text())["status"] == "running"
                and not (r.parent / "checkpoints" / "latest.json").exists()] if (home / "runs").exists() else True
    # and the registry still takes writes: the lock was not left held
    assert dsft("registry", "import", str(src), "--domain", "finance").returncode == 0


def test_a_kill_between_placing_the_directory_and_the_commit_is_undone_at_the_next_open(dsft, home, tmp_path):
    """The one window the random kills above rarely hit: the version directory is in place, its row not committed."""
    src = tmp_path / "peft"
    write_peft_dir(src)
    killed = ("import os, signal, sys\n"
              "from dsft.registry import open_registry\n"
              "from dsft.registry.transaction import Transaction\n"
              "Transaction.add_adapter = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
              "open_registry().import_dir(sys.argv[1], domain='finance')\n")
    env = {**os.environ, "DSFT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", killed, str(src)], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL and (home / "adapters" / "finance" / "0.1.0").is_dir()

    report = json.loads(dsft("registry", "verify", "--json").stdout)  # opening the registry undoes the placement
    assert report["ok"] and not (home / "adapters" / "finance" / "0.1.0").exists(), report
    assert dsft("registry", "gc").returncode == 0
    assert not [p for p in (home / "adapters" / "finance").iterdir()]
    assert dsft("registry", "import", str(src), "--domain", "finance").returncode == 0  # and 0.1.0 is free again
    assert [a["version"] for a in json.loads(dsft("registry", "list", "--json").stdout)] == ["0.1.0"]
