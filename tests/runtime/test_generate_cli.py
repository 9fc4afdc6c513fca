"""`dsft generate`: the CLI streams the completion that the Python API gives."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from dsft.cli.main import app


def test_generate_prints_the_runtime_completion(attached, refs):
    prompt = "What is a collateralized debt obligation?"
    want = attached.generate(prompt, adapter="finance", max_new_tokens=12)  # an instruction, as the CLI takes it
    result = CliRunner().invoke(app, ["generate", "--adapter", refs["finance"], prompt, "--max-new-tokens", "12", "-q"])
    assert result.exit_code == 0, result.output
    assert result.stdout == want.text + "\n"
    result = CliRunner().invoke(app, ["generate", "--adapter", refs["finance"], prompt, "-n", "12", "--json"])
    out = json.loads(result.stdout)
    assert out["text"] == want.text and out["adapter"] == refs["finance"] and out["completion_tokens"] == len(want.token_ids)


def test_generate_with_an_unknown_adapter_is_one_line(rt_home):
    result = CliRunner().invoke(app, ["generate", "--adapter", "astrology", "hello"])
    assert result.exit_code == 3 and "astrology" in result.output and "Traceback" not in result.output


def test_generate_with_a_domain_takes_its_production_version_and_says_which(refs):
    import dsft

    reg = dsft.open_registry()
    try:
        reg.tag(refs["finance"], "production")  # finance@0.2.0 is newer: the tag decides
        result = CliRunner().invoke(app, ["generate", "--adapter", "finance", "Define duration.", "-n", "2"])
    finally:
        reg.untag("finance", "production")
        reg.close()
    assert result.exit_code == 0, result.output
    assert f"finance -> {refs['finance']} (production tag)" in result.output
