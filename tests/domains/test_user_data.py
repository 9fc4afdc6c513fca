"""A user's domain trains on the user's data: `domains new --data` files become source domain.user,
replace the generated template text, and terms without definitions never get invented ones."""
from __future__ import annotations

import json
import re

import pytest

from dsft.data.user_data import UserData, load_user_data
from dsft.domains import general_pack, generate_corpus, new_domain, resolve_domain
from dsft.recipes.schema import load_recipe
from dsft.recipes.sizing import on_cpu
from dsft.recipes.sources import StageData, phase_weights


def _contracts(tmp_path, n: int = 120):
    terms = tmp_path / "terms.txt"
    terms.write_text("force majeure\nindemnification clause\nliquidated damages\n")
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"Clause {i}: the force majeure notice is due within {i % 30 + 1} days."}) + "\n"
                            for i in range(n)))
    new_domain("contracts", terms, data)
    return resolve_domain("contracts")


def test_the_domains_own_data_is_the_mixture_and_its_held_out_share_never_trains(home, tmp_path, tiny_base_dir):
    from transformers import AutoTokenizer

    pack = _contracts(tmp_path)
    user = load_user_data(pack.data_files, data_files=[])
    assert len(user.heldout) == 24 and len(user.sources["domain.user"]) == 96  # 120 records: 20% held out, 96 train
    held = {r.text for r in user.heldout}
    assert not held & {r.text for r in user.sources["domain.user"]}

    stage = on_cpu(load_recipe("lora").stages[0])  # names domain.instruct: the default, not a request for generated text
    data = StageData.build(stage, pack, general_pack(), AutoTokenizer.from_pretrained(tiny_base_dir), user, seed=0, steps=2)
    assert data.realised == {"domain.user": 2 * stage.batch_size}

    asked = load_user_data(pack.data_files, data_files=[], keep_generated=True)
    mixed = StageData.build(stage, pack, general_pack(), AutoTokenizer.from_pretrained(tiny_base_dir), asked, seed=0, steps=4)
    assert set(mixed.realised) == {"domain.user", "domain.instruct"}


def test_user_data_takes_the_generated_texts_weight_and_replay_still_applies():
    recipe = load_recipe("lora", ["stages.0.replay=0.2"])
    stage = recipe.stages[0]
    both = UserData({"domain.user": ("a",), "user": ("b",)})
    assert phase_weights(stage, stage.mixtures[0], both) == pytest.approx({"domain.user": 0.4, "user": 0.4, "general.raw": 0.2})
    assert phase_weights(stage, stage.mixtures[0], UserData()) == pytest.approx({"domain.instruct": 0.8, "general.raw": 0.2})
    kept = UserData({"user": ("b",)}, keep_generated=True)
    assert phase_weights(stage, stage.mixtures[0], kept) == pytest.approx({"domain.instruct": 0.4, "user": 0.4, "general.raw": 0.2})


def test_terms_without_definitions_never_get_placeholder_definitions(home, tmp_path):
    pack = _contracts(tmp_path)
    assert all(d == "" for _, d in pack.terms)
    corpus = generate_corpus(pack, n_raw=60, n_instruct=60)
    texts = list(corpus.raw_train) + [p["prompt"] + " " + p["response"] for p in corpus.instruct_train]
    assert corpus.instruct_train and corpus.raw_train
    for text in texts:
        assert "a term used in" not in text and not re.search(r"\bis\s*(\.|$)|:\s*$", text), text


def test_domains_show_lists_data_files_with_record_counts_and_says_when_text_is_generated(home, tmp_path):
    from typer.testing import CliRunner

    from dsft.cli.main import app

    _contracts(tmp_path, n=7)
    mine = json.loads(CliRunner().invoke(app, ["domains", "show", "contracts", "--json"]).stdout)
    assert mine["data_files"] == [{"path": str((tmp_path / "text.jsonl").resolve()), "records": 7}]
    assert mine["terms_without_definition"] == 3
    shipped = json.loads(CliRunner().invoke(app, ["domains", "show", "finance", "--json"]).stdout)
    assert shipped["data_files"] == [] and shipped["training_text"].startswith("generated")


def test_eval_data_is_the_held_out_set_and_its_overlap_with_training_is_counted(home, tmp_path):
    pack = _contracts(tmp_path, n=40)
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text((tmp_path / "text.jsonl").read_text().splitlines(keepends=True)[3] + json.dumps({"text": "A new clause."}) + "\n")
    user = load_user_data(pack.data_files, data_files=[], eval_data=[heldout])
    assert len(user.sources["domain.user"]) == 40  # nothing split off: the given file is the held-out set
    assert len(user.heldout) == 2 and user.overlap == 1
    assert user.heldout_name == "user held-out (2 records)"


def test_eval_rebuilds_a_runs_held_out_set_from_what_its_metrics_recorded(home, tmp_path):
    from dsft.data.user_data import rebuild_heldout
    from dsft.eval.evaluate import _user_heldout

    pack = _contracts(tmp_path, n=60)
    user = load_user_data(pack.data_files, data_files=[])
    described = json.loads(json.dumps(user.describe()))  # as the adapter's metrics store it
    assert rebuild_heldout(described) == user.heldout and len(user.heldout) == 12
    records, why = _user_heldout((), {"metrics": {"user_data": described}})
    assert records == list(user.heldout) and why is None
    (tmp_path / "text.jsonl").unlink()
    records, why = _user_heldout((), {"metrics": {"user_data": described}})
    assert records == [] and "give it with --data" in why
