"""ESFT expert selection: the smallest set of experts whose normalised scores reach p, per layer."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from dsft.adapters.esft import select_experts
from dsft.cli.main import app


def test_selection_takes_the_highest_scores_until_p_is_reached():
    scores = [0.05, 0.40, 0.10, 0.30, 0.15]
    assert select_experts(scores, 0.2) == [1]
    assert select_experts(scores, 0.5) == [1, 3]
    assert select_experts(scores, 0.71) == [1, 3, 4]
    assert select_experts([2.0, 2.0], 1.0) == [0, 1]  # unnormalised counts work the same
    assert select_experts([0, 0, 0], 0.2) == []


def test_experts_score_cli_writes_a_per_layer_selection(home, tmp_path):
    out = tmp_path / "sel.json"
    for method, p in (("token", 0.2), ("gate", 0.1)):
        result = CliRunner().invoke(app, ["experts", "score", "--domain", "finance", "--method", method,
                                          "--sample-tokens", "4096", "--out", str(out), "--json"])
        assert result.exit_code == 0, result.stderr
        sel = json.loads(out.read_text())
        assert sel["method"] == method and sel["p"] == p
        assert set(sel["layers"]) == {"1", "2", "3"}  # the MoE layers of tiny-deepseek-v2
        for layer in sel["layers"].values():
            assert abs(sum(layer["scores"]) - 1) < 1e-4 and layer["selected"]
            top = max(range(len(layer["scores"])), key=layer["scores"].__getitem__)
            assert top in layer["selected"]
        assert 0 < sel["selected_share"] < 1
    bad = CliRunner().invoke(app, ["experts", "score", "--p", "1.5"])
    assert bad.exit_code == 2 and "--p must be in (0, 1]" in bad.stderr
