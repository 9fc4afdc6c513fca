"""Issue 15.4 and the pickle item: ``dsft registry import`` copies plain files only, never what a link points at,
keeps manifest entries inside the adapter directory, and refuses pickled weights."""
from __future__ import annotations

import json
import os

import pytest
from security_helpers import one_error_line, write_peft_dir

from dsft.atomic import sha256_file


def _nothing_registered(dsft, home):
    listed = dsft("registry", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == []
    leftovers = [p for p in (home / "adapters").rglob("*")] if (home / "adapters").exists() else []
    assert not [p for p in leftovers if p.is_file()], leftovers


@pytest.mark.parametrize("make", ["secret-file", "directory", "dev-zero", "fifo"])
def test_links_and_special_files_are_refused(dsft, home, tmp_path, make):
    src = tmp_path / "peft"
    write_peft_dir(src)
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    secret.chmod(0o600)
    if make == "secret-file":
        (src / "notes.txt").symlink_to(secret)
    elif make == "directory":
        (src / "more").symlink_to(tmp_path, target_is_directory=True)
    elif make == "dev-zero":
        (src / "big.bin.safetensors").symlink_to("/dev/zero")
    else:
        os.mkfifo(src / "pipe")
    line = one_error_line(dsft("registry", "import", str(src), "--domain", "finance"))
    assert "symbolic link" in line or "not a regular file" in line
    _nothing_registered(dsft, home)


def test_a_manifest_naming_a_file_outside_the_directory_is_refused(dsft, home, tmp_path):
    src = tmp_path / "exported"
    write_peft_dir(src)
    outside = tmp_path / "x"
    outside.write_text("not part of the adapter")
    files = {p.name: sha256_file(p) for p in src.iterdir()}
    files["../x"] = sha256_file(outside)  # a matching hash: only the path gives it away
    (src / "dsft_adapter.json").write_text(json.dumps({"schema_version": 1, "kind": "lora", "files": files}))
    line = one_error_line(dsft("registry", "import", str(src), "--domain", "finance"))
    assert "'../x'" in line and "outside the adapter directory" in line
    _nothing_registered(dsft, home)


def test_pickled_weights_are_refused(dsft, home, tmp_path):
    src = tmp_path / "pickled"
    write_peft_dir(src)
    (src / "adapter_model.safetensors").rename(src / "adapter_model.bin")
    line = one_error_line(dsft("registry", "import", str(src), "--domain", "finance"))
    assert "adapter_model.bin" in line and "safetensors only" in line
    _nothing_registered(dsft, home)
