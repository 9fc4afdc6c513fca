"""``eval_every`` (``dsft train --eval-every N``): held-out losses inside a stage, on the progress output, in the
training log and for the trackers, without changing what the run trains."""
from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from dsft.cli.main import app
from dsft.eval.logs import read_training_log


def _train(*extra: str) -> tuple[dict, str]:
    result = CliRunner().invoke(app, ["train", "--domain", "finance", "--max-steps", "6", "--report-to", "none",
                                      "--json", *extra])
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def test_held_out_losses_every_n_steps_leave_the_training_as_it_was(home):
    plain, _ = _train()
    every, _ = _train("--eval-every", "2")
    # the same run: evaluating between steps changes no weight, RNG or mode the next step sees
    assert every["metrics"]["eval_loss_after"] == plain["metrics"]["eval_loss_after"]
    assert [s["final_loss"] for s in every["metrics"]["stages"]] == [s["final_loss"] for s in plain["metrics"]["stages"]]
    log = read_training_log(Path(every["path"]))
    measured = {r["step"]: r["heldout"] for r in log if "heldout" in r}
    assert sorted(measured) == [2, 4]  # not 6: the stage's own evaluation follows its last step
    assert set(measured[2]) == {"domain_loss", "general_loss"} and all(v > 0 for v in measured[2].values())
    assert not any("heldout" in r for r in read_training_log(Path(plain["path"])))
    shown = CliRunner().invoke(app, ["logs", every["adapter"], "--json"])
    assert shown.exit_code == 0, shown.stderr
    assert [h["step"] for h in json.loads(shown.stdout)["stages"][0]["heldout"]] == [2, 4]


def test_the_progress_output_shows_each_mid_stage_evaluation(home):
    result = CliRunner().invoke(app, ["train", "--domain", "finance", "--max-steps", "4", "--eval-every", "3",
                                      "--report-to", "none"])
    assert result.exit_code == 0, result.stderr
    assert "step 3 of sft: generated pack text loss" in " ".join(result.stderr.split())


def test_a_negative_eval_every_is_one_line(home):
    result = CliRunner().invoke(app, ["train", "--eval-every", "-1", "--max-steps", "1"])
    assert result.exit_code != 0 and "Traceback" not in result.stderr
    assert "eval_every: must be >= 0" in result.stderr
