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


def test_the_base_is_measured_once_per_version_and_rows(new_home, tmp_path, monkeypatch, tiny_base_dir):
    """Held-out figures of an unmodified base are cached by its fingerprint and the rows: the second measurement
    reads the file and returns the same numbers; other rows or another base version are measured anew."""
    import torch

    # a cache of its own, not the figures other tests share (tests/conftest.py's base_figures)
    home = new_home(tmp_path / "home", share_base_figures=False)
    monkeypatch.setenv("DSFT_HOME", str(home))

    from dsft.base import load_base
    from dsft.eval.base_cache import base_key
    from dsft.eval.losses import heldout_loss

    loaded = load_base("tiny-deepseek-v2", device="cpu")
    ids = torch.randint(0, 400, (3, 32), generator=torch.Generator().manual_seed(0))
    rows = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    key = base_key(loaded.fingerprint["id"], loaded.model)
    first = heldout_loss(loaded.model, rows, base_key=key)
    (cached,) = (home / "cache" / "base-heldout").iterdir()
    with torch.no_grad():
        loaded.model.get_output_embeddings().weight.mul_(0)  # a changed model under the same key: the cache answers
    assert heldout_loss(loaded.model, rows, base_key=key) == first
    assert heldout_loss(loaded.model, rows) != first  # without a key nothing is cached
    assert heldout_loss(loaded.model, rows, base_key=key.replace(loaded.fingerprint["id"], "0" * 64)) != first
    assert len(list(cached.parent.iterdir())) == 2
