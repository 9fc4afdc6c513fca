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


def test_domains_new_takes_what_train_takes_several_files_a_directory_a_glob_and_a_mapping(home, tmp_path):
    (tmp_path / "terms.txt").write_text("loss adjuster\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("Claims are assessed.\n")
    for name in ("q1", "q2"):
        (tmp_path / f"{name}.csv").write_text("question,answer\nWhat is a claim?,A request for payment.\n")

    # as a shell leaves `--data notes --data q*.csv`: the glob's second match arrives as an argument
    result = invoke("domains", "new", "claims", "--terms", str(tmp_path / "terms.txt"), "--data", str(tmp_path / "notes"),
                    "--data", str(tmp_path / "q1.csv"), str(tmp_path / "q2.csv"),
                    "--field", "prompt=question", "--field", "response=answer")

    assert result.exit_code == 0, result.stderr
    from dsft.data.files import load_records
    from dsft.domains import resolve_domain

    pack = resolve_domain("claims")
    assert pack.data_files == ((tmp_path / "notes").resolve(), (tmp_path / "q1.csv").resolve(), (tmp_path / "q2.csv").resolve())
    records = load_records(pack.data_sources())
    assert [r.kind for r in records] == ["text", "instruction", "instruction"]
    assert records[1].response == "A request for payment."


def test_domains_new_refuses_a_mapping_that_misses_and_writes_nothing(home, tmp_path):
    (tmp_path / "terms.txt").write_text("loss adjuster\n")
    (tmp_path / "qa.csv").write_text("question,answer\nq,a\n")

    result = invoke("domains", "new", "claims", "--terms", str(tmp_path / "terms.txt"), "--data", str(tmp_path / "qa.csv"),
                    "--field", "response=reply")

    assert result.exit_code == 4 and "--field response=reply: no field 'reply' here" in result.stderr
    assert not (home / "domains" / "claims.yaml").exists()


def test_recipes_show_prints_the_commented_yaml_and_validate_reports_problems(tmp_path):
    shown = invoke("recipes", "show", "lora")
    assert shown.exit_code == 0 and shown.stdout.startswith("# Run: dsft train")
    bad = tmp_path / "bad.yaml"
    bad.write_text(shown.stdout.replace("lr: 2.0e-3", "lr: -1"))
    result = invoke("recipes", "validate", str(bad))
    assert result.exit_code == 2 and "stages[0].lr: must be > 0" in result.stderr
