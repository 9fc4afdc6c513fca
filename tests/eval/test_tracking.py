"""Live tracking through accelerate's trackers: what --report-to takes, and a recipe as run parameters (the events
written while a run trains are checked in tests/eval/test_logs.py, on the run that test trains)."""
from __future__ import annotations

import importlib.util

import pytest

from dsft.errors import UsageError
from dsft.eval.tracking import flat_params, parse_report_to


def test_report_to_names_trackers_and_refuses_what_it_cannot_track():
    assert parse_report_to("tensorboard") == ("tensorboard",)
    assert parse_report_to("none") == () and parse_report_to("") == ()
    assert "tensorboard" in parse_report_to("all")
    with pytest.raises(UsageError, match="unknown tracker 'neptune'; choose from tensorboard, mlflow, wandb, all, none"):
        parse_report_to("tensorboard,neptune")
    for name in ("mlflow", "wandb"):
        if importlib.util.find_spec(name) is None:
            with pytest.raises(UsageError, match=f"pip install {name}"):
                parse_report_to(name)


def test_a_recipe_becomes_flat_run_parameters():
    params = flat_params({"domain": "legal", "recipe": {"stages": [{"lr": 2e-4, "data": [{"source": "user", "weight": 1.0}],
                                                                   "seq_len": None, "targets": ["attention", "routed_experts"]}]}})
    assert params == {"domain": "legal", "recipe.stages.0.lr": 2e-4, "recipe.stages.0.data.0.source": "user",
                      "recipe.stages.0.data.0.weight": 1.0, "recipe.stages.0.seq_len": "None",
                      "recipe.stages.0.targets": "['attention', 'routed_experts']"}
