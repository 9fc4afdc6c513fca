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


def test_steps_join_up_across_stages_and_a_resumed_run_goes_on_from_its_checkpoint(tmp_path):
    from dsft.eval.tracking import RunTracker
    from dsft.recipes.loop import StepInfo

    class Recorder:
        name = "recorder"

        def __init__(self):
            self.logged: list[tuple[int, dict]] = []

        def log(self, values, step):
            self.logged.append((step, values))

    def info(step: int) -> StepInfo:
        return StepInfo(step, 10, 2.0, 0.0, 1e-3, 100.0, 1.0)

    def events(tracker: RunTracker, resume_at: tuple[int, int] | None) -> list[int]:
        rec = Recorder()
        tracker.trackers = [rec]
        stage, step = resume_at or (0, 0)
        if resume_at:  # stage 0 had 3 steps in the first process
            tracker("resume", {"run": "r", "stage": "sft", "step": step, "steps_done": 3 * stage + step})
        for index in range(stage, 2):
            start = step if index == stage else 0
            tracker("stage_start", {"index": index, "stage": f"s{index}", "steps": 3, "start_step": start})
            for s in range(start + 1, 4):
                tracker("step", {"stage": f"s{index}", "info": info(s)})
                if s == 2:  # eval_every: held-out losses at the step they followed
                    tracker("step_eval", {"stage": f"s{index}", "step": s, "domain_loss": 1.5, "domain_ppl": 4.5})
                    assert rec.logged[-1] == (rec.logged[-2][0], {"heldout/domain_loss": 1.5, "heldout/domain_ppl": 4.5})
            tracker("stage_eval", {"stage": f"s{index}", "domain_loss": 1.0})
        tracker("eval", {"when": "after", "domain_loss": 1.0, "domain_ppl": 2.7})
        assert [v for _, v in rec.logged][-1] == {"eval/domain_loss_after": 1.0, "eval/domain_ppl_after": 2.7}
        return [s for s, v in rec.logged if "train/loss" in v]

    assert events(RunTracker([], "r", tmp_path, {}), None) == [1, 2, 3, 4, 5, 6]
    assert events(RunTracker([], "r", tmp_path, {}), (0, 2)) == [3, 4, 5, 6]
    assert events(RunTracker([], "r", tmp_path, {}), (1, 1)) == [5, 6]
