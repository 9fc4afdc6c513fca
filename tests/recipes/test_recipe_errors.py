"""Bad recipes through the real CLI: one line naming the problem, a non-zero exit, nothing written."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

GOOD = """name: mine
description: test recipe
stages:
  - name: one
    kind: sft
    data: [{source: domain.instruct, weight: 1.0}]
    lr: 1.0e-4
    steps: 10
"""

CASES = {
    "malformed-yaml": ("name: x\nstages: [\n  - oops: : :\n", "malformed YAML at line 3, column"),
    "unknown-kind": (GOOD.replace("kind: sft", "kind: pretrain"), "stages[0].kind: must be one of 'cpt' | 'sft' | 'esft' | 'distill', got 'pretrain'"),
    "trains-nothing": (GOOD.replace("steps: 10", "steps: 10\n    train: {lora: [], terms: false}"), "stages[0].train: the stage trains nothing"),
    "zero-weight": (GOOD.replace("weight: 1.0", "weight: 0"), "stages[0].data[0].weight: must be > 0, got 0"),
    "negative-weight-in-a-phase": (GOOD.replace("    data: [{source: domain.instruct, weight: 1.0}]",
                                                "    phases: [{name: a, fraction: 1.0, data: [{source: domain.raw, weight: -1}]}]"),
                                   "stages[0].phases[0].data[0].weight: must be > 0, got -1"),
}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and "bases" not in p.parts}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_recipe_fails_in_one_line_and_writes_nothing(home, tmp_path, case):
    from dsft.cli.main import app

    text, message = CASES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    before = _files(home)
    for args in (["train", "--recipe", str(path)], ["recipes", "validate", str(path)]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.stderr
        assert message in result.stderr.replace("\n", ""), result.stderr
        assert result.stderr.strip().startswith("error:") and result.stderr.count("error:") == 1
    assert _files(home) == before
