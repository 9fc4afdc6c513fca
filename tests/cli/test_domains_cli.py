"""`dsft domains` and `dsft recipes`: listing, showing and creating, through the real CLI app."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from dsft.cli.main import app


def invoke(*args):
    return CliRunner().invoke(app, list(args))


def test_domains_list_shows_the_three_packs_with_150_terms_each(home):
    result = invoke("domains", "list", "--json")
    assert result.exit_code == 0, result.stderr
    packs = {p["name"]: p for p in json.loads(result.stdout)}
    assert {"finance", "legal", "medical"} <= set(packs)
    assert all(packs[n]["terms"] >= 150 for n in ("finance", "legal", "medical"))


def test_domains_show_lists_real_terms(home):
    result = invoke("domains", "show", "legal", "--json")
    assert result.exit_code == 0
    assert "habeas corpus" in json.loads(result.stdout)["terms"]


def test_domains_new_then_train_it(home, tmp_path):
    (tmp_path / "terms.txt").write_text("subrogation clause: the insurer's right to recover what it paid\nloss adjuster\n")
    (tmp_path / "claims.jsonl").write_text('{"prompt": "What is a loss adjuster?", "response": "An expert who assesses claims."}\n')
    result = invoke("domains", "new", "insurance", "--terms", str(tmp_path / "terms.txt"), "--data", str(tmp_path / "claims.jsonl"))
    assert result.exit_code == 0, result.stderr
    assert "insurance" in {p["name"] for p in json.loads(invoke("domains", "list", "--json").stdout)}
    again = invoke("domains", "new", "insurance", "--terms", str(tmp_path / "terms.txt"))
    assert again.exit_code != 0 and "exists" in again.stderr


def test_recipes_show_prints_the_commented_yaml_and_validate_reports_problems(tmp_path):
    shown = invoke("recipes", "show", "lora")
    assert shown.exit_code == 0 and shown.stdout.startswith("# Run: dsft train")
    bad = tmp_path / "bad.yaml"
    bad.write_text(shown.stdout.replace("lr: 2.0e-3", "lr: -1"))
    result = invoke("recipes", "validate", str(bad))
    assert result.exit_code == 2 and "stages[0].lr: must be > 0" in result.stderr
