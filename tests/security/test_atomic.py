"""Atomic writes never touch the process umask (not thread-safe under the server) and sync the directory after the rename."""
from __future__ import annotations

import os
import stat

from dsft.atomic import publish_dir, staging_dir, write_text_atomic


def test_writes_never_set_the_umask_and_sync_the_directory(tmp_path, monkeypatch):
    def no_umask(*_):
        raise AssertionError("os.umask called: another thread creating a file meanwhile would get mode 0666")

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "umask", no_umask)
    monkeypatch.setattr(os, "fsync", fsync)
    write_text_atomic(tmp_path / "a" / "x.json", "{}")
    assert synced == ["file", "dir"]
    with staging_dir(tmp_path / "v1") as staged:
        (staged / "w").write_text("w")
        publish_dir(staged, tmp_path / "v1")
    assert synced[-1] == "dir"


def test_a_written_file_gets_the_usual_permissions(tmp_path):
    mask = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "x.txt", "x")
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o640
