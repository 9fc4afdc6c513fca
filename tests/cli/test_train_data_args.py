"""`dsft train --data`: several paths, what a shell glob expands to, --field and --split reach the run."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from dsft.cli.main import app


@pytest.fixture
def trains(monkeypatch):
    """Record what `dsft train` asks the runner for instead of training."""
    calls = []

    def fake_train(**kwargs):
        calls.append(kwargs)
        return SimpleNamespace(to_json=lambda: {"adapter": "x@0.1.0"})

    monkeypatch.setattr("dsft.recipes.runner.train", fake_train)
    return calls


def test_a_shell_expanded_glob_after_data_is_data_and_overrides_stay_overrides(home, tmp_path, trains):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(f"{name}\n")

    # what a shell runs for: dsft train --data *.txt --field response=answer --split dev stages.0.lr=1e-3
    result = CliRunner().invoke(app, ["train", "--json", "--data", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
                                      str(tmp_path / "c.txt"), "--field", "response=answer", "--split", "dev",
                                      "stages.0.lr=1e-3"])

    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == {"adapter": "x@0.1.0"}
    [call] = trains
    assert [s.location for s in call["data"]] == [str(tmp_path / f"{n}.txt") for n in ("a", "b", "c")]
    assert {(s.split, s.fields) for s in call["data"]} == {("dev", (("response", "answer"),))}
    assert call["overrides"] == ["stages.0.lr=1e-3"]
