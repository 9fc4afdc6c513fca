"""Live tracking through accelerate's trackers: TensorBoard events written while the run trains."""
from __future__ import annotations

import importlib.util

import pytest

from dsft.errors import UsageError
from dsft.eval.tracking import flat_params, parse_report_to


def _scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = sorted((run_dir / "tracking").glob("*/events.out.tfevents.*"))
    assert logs, f"no TensorBoard events under {run_dir / 'tracking'}"
    acc = EventAccumulator(str(logs[0].parent))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_are_written_while_the_run_trains(home):
    import dsft

    seen = {}

    def on_event(kind, payload):
        if kind == "step" and payload["info"].step == 2:  # mid-run: steps 1 and 2 are on disk, step 3 is to come
            (run_dir,) = (home / "runs").iterdir()
            seen.update(_scalars(run_dir))

    result = dsft.train(domain="medical", max_steps=3, on_event=on_event)
    assert [s for s, _ in seen["train/loss"]] == [1, 2]
    final = _scalars(home / "runs" / result.metrics["run"])
    assert [s for s, _ in final["train/loss"]] == [1, 2, 3]
    assert all(v > 0 for _, v in final["train/grad_norm"]) and len(final["train/lr"]) == 3
    assert {"eval/domain_loss_before", "eval/domain_loss", "eval/general_loss"} <= set(final)


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
