"""`dsft eval` on a trained adapter: base vs adapter with intervals, recorded in the registry; `--compare`."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from dsft.cli.main import app


def test_eval_reports_gain_forgetting_terms_experts_and_records_verified(home, tmp_path):
    import dsft

    first = dsft.train(domain="finance", max_steps=6)
    second = dsft.train(domain="finance", max_steps=12)
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "EBITDA margin is a measure of", "choices": ["profitability", "rainfall"], "answer": 0}) + "\n")
    out = CliRunner().invoke(app, ["eval", "--adapter", first.adapter, "--mc", str(mc), "--json"])
    assert out.exit_code == 0, out.stderr
    r = json.loads(out.stdout)
    dom = r["domain"]
    assert dom["loss_adapter"] < dom["loss_base"] and dom["delta_ci"][1] < 0  # the gain is significant
    assert dom["loss_adapter_ci"][0] <= dom["loss_adapter"] <= dom["loss_adapter_ci"][1]
    assert r["terms"]["added"] > 50 and r["terms"]["pieces_per_term_without"] >= 2
    assert r["terms"]["pieces_per_term_with"] == 1.0  # measured on the held-out text: a term and its space, one token
    assert r["headline"] == "domain" and dom["set"] == "generated pack text"  # no user data: the figure says what it is
    assert 0 < r["terms"]["share_of_heldout_tokens"] < 1
    layers = r["experts"]["domain"]
    assert layers and all(0 <= u["entropy"] <= 1 for u in layers.values())
    assert r["multiple_choice"]["items"] == 1
    row = dsft.open_registry().check(first.adapter, base_fingerprint=dsft.base.fingerprint_for("tiny-deepseek-v2")[2])
    assert row.status == "verified" and "eval_domain_loss" in (row.metrics or {})

    cmp = CliRunner().invoke(app, ["eval", "--compare", first.adapter, "--compare", second.adapter, "--json"])
    assert cmp.exit_code == 0, cmp.stderr
    rows = json.loads(cmp.stdout)["loss"]
    assert rows["domain"]["difference"] < 0  # the longer-trained version is better on its domain
    lo, hi = rows["domain"]["difference_ci"]
    assert lo <= rows["domain"]["difference"] <= hi
