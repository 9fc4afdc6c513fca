"""A checkpoint's state is a typed record: it round-trips through state.json, and the dict that older
dsft versions wrote (state version 1) is upgraded on load, so their runs can still be resumed."""
from __future__ import annotations

import json

import pytest
import torch

from dsft.adapters.esft import EsftState
from dsft.atomic import sha256_file
from dsft.errors import IntegrityError
from dsft.recipes.checkpoint import STATE, STATE_VERSION, CheckpointState, RunDir, RunKey, upgrade_state_v1

# What the runner of state version 1 wrote mid-way through an ESFT stage (keys as it built them).
V1 = {"schema_version": 1, "stage": 1, "step": 4, "losses": [2.5, 2.25, 2.0, 1.75],
      "before": {"domain_loss": 3.0, "domain_ppl": 20.09, "general_loss": 3.5, "general_ppl": 33.12},
      "stages": [{"stage": "cpt", "final_loss": 2.75}], "log": [{"stage": "cpt", "step": 0, "loss": 3.0}],
      "trained": {"layers.1.mlp.experts.gate_up_proj#3": 64},
      "esft": {"method": "gate", "p": 0.1, "lora": False, "tokens": 2048, "selection": {"1": [3]}},
      "stage_selection": {"1": [3]}, "elapsed": 12.5, "python_rng": [3, [1, 2, 3], None]}


def test_a_version_1_state_is_upgraded_by_name_and_reads_as_the_same_position():
    assert upgrade_state_v1(V1)["schema_version"] == 2
    state = CheckpointState.from_json(V1)
    assert (state.stage, state.step, state.losses) == (1, 4, (2.5, 2.25, 2.0, 1.75))
    assert state.stage_metrics == ({"stage": "cpt", "final_loss": 2.75},) and state.selection == {1: (3,)}
    assert state.esft == EsftState("gate", 0.1, False, {1: (3,)}, 2048) and state.elapsed == 12.5
    oldest = {k: v for k, v in V1.items() if k not in ("stage_selection", "python_rng")}  # before ESFT resumed mid-stage
    assert CheckpointState.from_json(oldest).selection is None and CheckpointState.from_json(oldest).python_rng is None


def test_the_state_round_trips_through_a_run_directory(tmp_path):
    key = RunKey.build("finance", {"name": "lora"}, "tiny-deepseek-v2", "f" * 64, 0, None, [])
    run = RunDir.create(tmp_path, key, "name: lora\n")
    state = CheckpointState.from_json(V1)
    path = run.save_checkpoint(state, {"rng/torch": torch.get_rng_state()})
    assert path.name == "s01-000004" and json.loads((path / STATE).read_text())["schema_version"] == STATE_VERSION
    loaded = run.load_checkpoint()
    assert loaded.state == state and torch.equal(loaded.group("rng")["torch"], torch.get_rng_state())


def test_a_run_checkpointed_by_the_old_format_still_loads(tmp_path):
    key = RunKey.build("finance", {"name": "lora"}, "tiny-deepseek-v2", "f" * 64, 0, None, [])
    run = RunDir.create(tmp_path, key, "name: lora\n")
    path = run.save_checkpoint(CheckpointState.from_json(V1), {})
    (path / STATE).write_text(json.dumps(V1))  # as an older dsft left it, with latest.json naming its hash
    latest = path.parent / "latest.json"
    latest.write_text(json.dumps({**json.loads(latest.read_text()), "files": {
        **json.loads(latest.read_text())["files"], STATE: sha256_file(path / STATE)}}))
    assert run.load_checkpoint().state == CheckpointState.from_json(V1)


def test_a_newer_or_incomplete_state_is_refused_with_what_to_do():
    with pytest.raises(IntegrityError, match="written by a newer dsft.*upgrade dsft"):
        CheckpointState.from_json({**V1, "schema_version": STATE_VERSION + 1})
    with pytest.raises(IntegrityError, match="lacks before, trained; it cannot be resumed"):
        CheckpointState.from_json({k: v for k, v in V1.items() if k not in ("before", "trained")})
