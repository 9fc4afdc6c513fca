"""The CLI's error line is plain text, and echoes user input cut short."""
from __future__ import annotations

import pytest
from security_helpers import one_error_line


@pytest.mark.parametrize("name", ["[/]x.yaml", "[bold red]x.yaml", ":x:x.yaml"])
def test_markup_in_a_message_is_printed_as_given(dsft, name):
    line = one_error_line(dsft("train", "--domain", name))
    assert f"domain file {name} does not exist" in line


def test_a_long_name_is_echoed_cut_short(dsft):
    name = "a" * 5000
    for args in (["train", "--domain", name], ["train", "--base", name], ["registry", "show", f"{name}@0.1.0"]):
        line = one_error_line(dsft(*args))
        assert len(line) < 500, line


def test_a_file_given_as_domain_is_not_printed_back(dsft, tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    line = one_error_line(dsft("train", "--domain", str(secret)))
    assert "root:x" not in line and "ending in .yaml" in line  # only a .yaml path is read as a pack


def test_a_path_with_brackets_in_a_success_message_is_printed_as_given(dsft, tmp_path, monkeypatch):
    """Once the work is done, printing where it went must not fail (rich would read ``[/]`` as markup)."""
    import importlib
    from types import SimpleNamespace

    out = tmp_path / "finance[/]peft [bold]x"
    done = SimpleNamespace(ref="finance@0.1.0", format="peft", path=out, files=["adapter_config.json"])
    monkeypatch.setattr(importlib.import_module("dsft.runtime.export"), "export_adapter", lambda *a, **k: done)
    proc = dsft("export", "finance", "--format", "peft", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout.replace("\n", "")
