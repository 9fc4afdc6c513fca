"""``dsft registry ...`` through Typer's runner: tables, --json, one red line and an exit code on errors.

``check`` and ``add-base`` resolve bases through dsft.base; here a stand-in module answers instead,
so these tests need neither torch nor a model.
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from registry_helpers import fingerprint, register, write_adapter_files
from typer.testing import CliRunner

from dsft.cli.registry_cmd import app
from dsft.registry import open_registry

runner = CliRunner()


@pytest.fixture
def cli(registry_url: str):
    """Run ``dsft registry ARGS --registry URL``; returns the result."""
    def run(*args: str):
        return runner.invoke(app, [*args, "--registry", registry_url], catch_exceptions=False)
    return run


@pytest.fixture
def populated(registry_url: str):
    with open_registry(registry_url) as reg:
        register(reg, "finance", fingerprint(), metrics={"domain_loss": 1.25})
        register(reg, "finance", fingerprint(), metrics={"domain_loss": 1.125}, parent="0.1.0")
        register(reg, "legal", fingerprint(), kind="lora", added_tokens=[])
        reg.tag("finance@0.2.0", "production")
        yield reg


@pytest.fixture
def fake_base(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict]:
    """dsft.base.fingerprint_for answering from a dict of name -> fingerprint."""
    bases = {"tiny": fingerprint(), "tiny-continued": fingerprint(weights="w2"),
             "tiny-newtok": fingerprint(tokenizer="t2")}
    mod = types.ModuleType("dsft.base")
    mod.fingerprint_for = lambda name: (name, f"preset:{name}", bases[name])
    monkeypatch.setitem(sys.modules, "dsft.base", mod)
    return bases


def test_list(cli, populated) -> None:
    r = cli("list")
    assert r.exit_code == 0
    for text in ("finance@0.1.0", "finance@0.2.0", "production", "legal@0.1.0", "lora+terms"):
        assert text in r.stdout
    rows = json.loads(cli("list", "--domain", "finance", "--json").stdout)
    assert [(x["ref"], x["tags"]) for x in rows] == [("finance@0.1.0", []), ("finance@0.2.0", ["production"])]
    assert rows[1]["parent"] == "0.1.0" and rows[1]["base"]["name"] == "tiny"
    assert rows[1]["metrics"] == {"domain_loss": 1.125}


def test_list_empty(cli) -> None:
    r = cli("list")
    assert r.exit_code == 0 and "no adapters registered yet" in r.stdout
    assert json.loads(cli("list", "--json").stdout) == []


def test_show(cli, populated) -> None:
    r = cli("show", "finance@production")
    assert r.exit_code == 0
    assert "finance@0.2.0" in r.stdout and "verified" in r.stdout and "tiny" in r.stdout
    data = json.loads(cli("show", "finance", "--json").stdout)
    assert data["ref"] == "finance@0.2.0" and data["manifest"]["version"] == "0.2.0"
    assert [c["status"] for c in data["compatibility"]] == ["verified"]


def test_errors_are_one_red_line_with_the_error_exit_code(cli, populated) -> None:
    for args, code, text in [
        (("show", "fin/ance"), 2, "bad adapter ref 'fin/ance'"),
        (("show", "finance@9.9.9"), 3, "no adapter finance@9.9.9; finance has versions 0.1.0, 0.2.0"),
        (("rm", "finance@0.2.0"), 2, "finance@0.2.0 is tagged production"),
        (("tag", "finance", "latest"), 2, "'latest' is reserved"),
        (("show", "x'; DROP TABLE adapters;--", "--json"), 2, "bad adapter ref"),
    ]:
        r = cli(*args)
        assert r.exit_code == code, r.output
        assert r.stdout == ""
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and text in lines[0]


def test_tag_moves(cli, populated) -> None:
    r = cli("tag", "finance@0.1.0", "production")
    assert r.exit_code == 0 and "finance@production -> 0.1.0 (was 0.2.0)" in r.stdout
    move = json.loads(cli("tag", "finance@0.2.0", "production", "--json").stdout)
    assert move == {"domain": "finance", "tag": "production", "ref": "finance@0.2.0", "version": "0.2.0",
                    "previous": "0.1.0"}
    assert cli("untag", "finance@production").exit_code == 0
    assert json.loads(cli("show", "finance@0.2.0", "--json").stdout)["tags"] == []


def test_rm(cli, populated) -> None:
    path = Path(populated.resolve("finance@0.2.0").path)
    assert cli("rm", "finance@0.2.0").exit_code == 2 and path.is_dir()
    out = json.loads(cli("rm", "finance@0.2.0", "--force", "--json").stdout)
    assert out == {"removed": "finance@0.2.0", "deleted_path": str(path), "tags_removed": ["production"]}
    assert not path.exists()
    r = cli("rm", "legal")
    assert r.exit_code == 0 and r.stdout.startswith("removed legal@0.1.0; deleted ")
    assert [x["ref"] for x in json.loads(cli("list", "--json").stdout)] == ["finance@0.1.0"]


def test_verify(cli, populated) -> None:
    r = cli("verify")
    assert r.exit_code == 0 and "checked 3 adapters: all files match" in r.stdout
    victim = Path(populated.resolve("legal").path) / "adapter_model.safetensors"
    victim.write_bytes(victim.read_bytes()[:-10])
    (populated.adapters_root / "legal" / "9.0.0").mkdir()
    r = cli("verify")
    assert r.exit_code == 6
    assert "changed legal@0.1.0:" in r.stdout and "orphan legal@9.0.0:" in r.stdout and "2 problems" in r.stdout
    report = json.loads(cli("verify", "--json").stdout)
    assert report["ok"] is False and report["problems"] == 2
    assert victim.exists()


def test_import(cli, tmp_path: Path) -> None:
    src = tmp_path / "peft-out"
    write_adapter_files(src)
    r = cli("import", str(src), "--domain", "medical")
    assert r.exit_code == 0 and "imported medical@0.1.0 (lora, 3 files)" in r.stdout
    rec = json.loads(cli("import", str(src), "--domain", "medical", "--version", "2.0.0", "--json").stdout)
    assert rec["ref"] == "medical@2.0.0" and rec["base"] is None and rec["compatibility"] == []
    r = cli("import", str(tmp_path / "nope"), "--domain", "medical")
    assert r.exit_code == 2 and "is not a directory" in r.stderr


def test_check_and_add_base(cli, populated, fake_base) -> None:
    r = cli("check", "finance@production", "--base", "tiny")
    assert r.exit_code == 0 and "finance@0.2.0 on tiny" in r.stdout and "verified" in r.stdout
    r = cli("check", "finance", "--base", "tiny-continued")
    assert r.exit_code == 0 and "compatible" in r.stdout and "dsft eval" in r.stdout
    r = cli("check", "finance", "--base", "tiny-newtok")
    assert r.exit_code == 7 and "incompatible" in r.stdout and "tokenizer changed" in r.stdout
    out = json.loads(cli("check", "finance", "--base", "tiny-newtok", "--json").stdout)
    assert out["status"] == "incompatible" and out["ok"] is False and out["base_name"] == "tiny-newtok"

    data = json.loads(cli("add-base", "tiny-newtok", "--json").stdout)
    assert data["base"]["name"] == "tiny-newtok"
    assert {c["ref"]: c["status"] for c in data["compatibility"]} == {
        "finance@0.1.0": "incompatible", "finance@0.2.0": "incompatible", "legal@0.1.0": "compatible"}
    r = cli("add-base", "tiny-continued")
    assert r.exit_code == 0 and "base tiny-continued" in r.stdout and r.stdout.count("compatible") == 3


def test_help_has_examples() -> None:
    for cmd in ("list", "show", "check", "add-base", "tag", "untag", "rm", "import", "verify"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "Example: dsft registry" in r.stdout and "--json" in r.stdout, cmd
