"""Registry files: a zero-byte registry.db is damage (never a new registry)."""
from __future__ import annotations

from security_helpers import one_error_line


def test_a_zero_byte_registry_is_refused_untouched(dsft, home):
    (home / "registry.db").write_bytes(b"")
    line = one_error_line(dsft("registry", "list"))
    assert "empty file (0 bytes)" in line and "left untouched" in line
    assert (home / "registry.db").read_bytes() == b""


def _import_with_manifest(dsft, tmp_path, architecture: str) -> None:
    import json

    from security_helpers import write_peft_dir

    from dsft.atomic import sha256_file

    src = tmp_path / "exported"
    write_peft_dir(src)
    files = {p.name: sha256_file(p) for p in src.iterdir()}
    (src / "dsft_adapter.json").write_text(json.dumps({
        "schema_version": 1, "domain": "finance", "version": "0.1.0", "kind": "lora", "files": files,
        "target_shapes": {}, "added_tokens": [],
        "base": {"name": "elsewhere", "source": None, "fingerprint": {"architecture": architecture}}}))
    assert dsft("registry", "import", str(src), "--domain", "finance").returncode == 0


def test_check_decides_an_architecture_mismatch_from_the_config_alone(dsft, home, tmp_path, monkeypatch):
    import importlib
    import json

    _import_with_manifest(dsft, tmp_path, "MixtralForCausalLM")

    def never(*_a, **_k):
        raise AssertionError("a preset was built or a base fingerprinted just to say incompatible")

    monkeypatch.setattr(importlib.import_module("dsft.base.loading"), "build_preset", never)
    monkeypatch.setattr(importlib.import_module("dsft.base.fingerprint"), "compute_fingerprint", never)
    proc = dsft("registry", "check", "finance", "--base", "tiny-deepseek-v2", "--json")
    assert proc.returncode == 7, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "incompatible"
    assert out["reasons"] == ["architecture differs: adapter trained on MixtralForCausalLM, base is DeepseekV2ForCausalLM"]


def test_verify_does_not_report_dsft_s_own_training_logs(dsft, home, tmp_path):
    import json

    _import_with_manifest(dsft, tmp_path, "DeepseekV2ForCausalLM")
    events = home / "adapters" / "finance" / "0.1.0" / "tensorboard" / "events.out.tfevents.1764528000.host.1.0"
    events.parent.mkdir()
    events.write_bytes(b"\x00" * 64)
    (events.parent.parent / "stray.txt").write_text("not dsft's")
    found = json.loads(dsft("registry", "verify", "--json").stdout)["findings"]
    assert [(f["kind"], f["path"].rsplit("/", 1)[-1]) for f in found] == [("unlisted", "stray.txt")]


def test_a_moved_home_uses_its_own_files(dsft, home, tmp_path, monkeypatch):
    import json
    import shutil

    _import_with_manifest(dsft, tmp_path, "DeepseekV2ForCausalLM")
    moved = tmp_path / "moved-home"
    shutil.copytree(home, moved, symlinks=True)
    shutil.rmtree(home / "adapters")  # the original's files are gone: the copy must not need them
    monkeypatch.setenv("DSFT_HOME", str(moved))
    assert dsft("registry", "verify").returncode == 0
    shown = json.loads(dsft("registry", "list", "--json").stdout)
    assert [a["path"] for a in shown] == [str(moved / "adapters" / "finance" / "0.1.0")]


def test_absolute_paths_of_an_older_registry_are_migrated(dsft, home, tmp_path):
    import json
    import sqlite3

    from dsft.registry.models import VERSION_TABLE

    _import_with_manifest(dsft, tmp_path, "DeepseekV2ForCausalLM")
    old_home = "/somewhere/else/.dsft"
    with sqlite3.connect(home / "registry.db") as db:  # as schema 0001 stored it, in the home it ran with
        db.execute("UPDATE adapters SET path = ?", (f"{old_home}/adapters/finance/0.1.0",))
        db.execute(f"UPDATE {VERSION_TABLE} SET version_num = '0001'")
    assert dsft("registry", "verify").returncode == 0
    with sqlite3.connect(home / "registry.db") as db:
        assert db.execute("SELECT path FROM adapters").fetchall() == [("adapters/finance/0.1.0",)]
    assert json.loads(dsft("registry", "list", "--json").stdout)[0]["path"] == str(home / "adapters" / "finance" / "0.1.0")
