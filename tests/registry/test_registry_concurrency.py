"""Reliability under concurrency and crashes, with real processes (spawn, as on macOS and Windows)."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

from registry_helpers import fingerprint, register, write_adapter_files

from dsft.registry import open_registry

WORKERS = 8


def _register_worker(url: str, home: str, barrier, out: mp.Queue) -> None:
    os.environ["DSFT_HOME"] = home
    try:
        barrier.wait(timeout=60)  # all eight open the (not yet created) registry together...
        with open_registry(url) as reg:
            barrier.wait(timeout=60)  # ...then all ask for the write lock together
            rec = register(reg, "finance", fingerprint(), metrics={"pid": os.getpid()})
            out.put(("ok", rec.version))
    except BaseException as err:  # report, so the parent can show it
        out.put(("error", f"{type(err).__name__}: {err}"))


def test_eight_processes_create_the_registry_and_register_the_same_domain_at_once(
        registry_url: str, dsft_home: Path) -> None:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    barrier = ctx.Barrier(WORKERS)
    procs = [ctx.Process(target=_register_worker, args=(registry_url, str(dsft_home), barrier, out))
             for _ in range(WORKERS)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [r for kind, r in results if kind == "error"] == []
    versions = sorted(r for _, r in results)
    assert len(set(versions)) == WORKERS
    with open_registry(registry_url) as reg:
        recs = reg.list_adapters("finance")
        assert sorted(r.version for r in recs) == versions == sorted(f"0.{i}.0" for i in range(1, WORKERS + 1))
        assert len({r.metrics["pid"] for r in recs}) == WORKERS  # no lost row
        assert reg.verify().ok


def _hang_in_registration(url: str, home: str, ready: str) -> None:
    os.environ["DSFT_HOME"] = home
    fp = fingerprint()
    with open_registry(url) as reg:
        staged = reg.adapters_root / "finance" / ".killed.partial"
        write_adapter_files(staged)
        with reg.transaction() as tx:
            base = tx.ensure_base(name="tiny", source="preset:tiny", fingerprint=fp)
            version = tx.next_adapter_version(domain="finance", base_fingerprint=fp)
            final = tx.place_dir(staged, domain="finance", version=version)
            tx.add_adapter(domain="finance", version=version, kind="lora", path=str(final),
                           manifest={"base": {"fingerprint": {k: v for k, v in fp.items() if k != "param_shapes"}}},
                           manifest_sha256="0" * 64, base=base)
            Path(ready).write_text(version)
            time.sleep(120)  # killed here: rows flushed, directory in place, nothing committed


def test_killed_registration_leaves_no_row_and_an_explained_directory(registry_url: str, dsft_home: Path,
                                                                      tmp_path: Path) -> None:
    with open_registry(registry_url) as reg:
        register(reg, "finance", fingerprint())
    ready = tmp_path / "ready"
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_hang_in_registration, args=(registry_url, str(dsft_home), str(ready)))
    p.start()
    deadline = time.time() + 60
    while not ready.exists() and p.is_alive() and time.time() < deadline:
        time.sleep(0.02)
    assert ready.read_text() == "0.2.0"
    os.kill(p.pid, signal.SIGKILL)
    p.join(timeout=30)
    assert p.exitcode == -signal.SIGKILL

    with open_registry(registry_url) as reg:  # opening undoes the placement the killed process left
        assert [r.version for r in reg.list_adapters()] == ["0.1.0"]  # no half row
        assert [b.name for b in reg.list_bases()] == ["tiny"]
        report = reg.verify()
        [finding] = report.findings
        assert report.ok and (finding.kind, Path(finding.path).name) == ("leftover", f".0.2.0.{p.pid}-unregistered.partial")
        assert "gc" in finding.detail
        # the lock died with the process (a held one would fail this after the busy timeout, not pass it);
        # the next registration goes on, and the version is free again
        assert register(reg, "finance", fingerprint()).version == "0.2.0"


