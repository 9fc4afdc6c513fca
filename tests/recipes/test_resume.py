"""Checkpoints and --resume: a run killed in the middle of a stage continues from its last checkpoint
and ends exactly where an uninterrupted run ends; a resume that does not fit is refused and writes nothing."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

# Two short stages (LoRA on the top half, then on every layer) with a checkpoint every 3 steps. 12 steps in
# stage 2: the kill comes at its checkpoint of step 6 or 9, and the resumed run has steps left to take.
RECIPE = """
name: resumable
description: two short stages for the resume tests
stages:
  - name: cpt
    kind: cpt
    data: [{source: domain.raw}]
    train: {lora: [attention, routed_experts], top_layers: 0.5}
    lr: 2.0e-3
    steps: 4
    batch_size: 4
    seq_len: 96
  - name: sft
    kind: sft
    data: [{source: domain.instruct}, {source: general.raw, weight: 0.5}]
    lr: 2.0e-3
    steps: 12
    batch_size: 4
    seq_len: 96
"""


def _latest_checkpoint(home: Path) -> str | None:
    for latest in home.glob("runs/*/checkpoints/latest.json"):
        try:
            return json.loads(latest.read_text())["dir"]
        except (OSError, json.JSONDecodeError):  # being replaced right now
            return None
    return None


def _outcome(metrics: dict) -> list[float]:
    return [metrics["eval_loss_after"], metrics["general_loss_after"], *(s["final_loss"] for s in metrics["stages"]),
            *(s["eval"]["domain_loss"] for s in metrics["stages"])]


def test_kill_9_in_the_middle_of_a_stage_then_resume_ends_with_the_same_loss(home, new_home, tmp_path):
    import dsft

    recipe = tmp_path / "resumable.yaml"
    recipe.write_text(RECIPE)
    env = {**os.environ, "DSFT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    args = ["train", "--recipe", str(recipe), "--checkpoint-every", "3", "--json", "-q"]
    child = subprocess.Popen([sys.executable, "-m", "dsft.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while True:  # wait for a checkpoint inside stage 2 (s01-<step>), then kill -9
        name = _latest_checkpoint(home)
        if name and name.startswith("s01-") and int(name.split("-")[1]) >= 6:
            os.kill(child.pid, signal.SIGKILL)
            break
        assert child.poll() is None, f"the run ended before it could be killed:\n{child.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    child.wait()
    assert child.returncode == -signal.SIGKILL
    run = next(home.glob("runs/*/run.json"))
    assert json.loads(run.read_text())["status"] == "running"
    assert not (home / "adapters" / "finance").exists() or not any((home / "adapters" / "finance").iterdir())
    killed_at = int(_latest_checkpoint(home).split("-")[1])
    assert 6 <= killed_at < 12  # mid-stage
    assert (run.parent / "stages" / "0-cpt" / "stage.json").exists()

    # The same command with --resume, in this process (the kill needed a process of its own; the resume does not,
    # and an interpreter's start-up is a third of a run here)
    resumed = _cli(*args, "--resume")
    assert resumed.exit_code == 0, resumed.stderr[-3000:]
    result = json.loads(resumed.stdout)
    assert result["adapter"] == "finance@0.1.0"
    assert result["metrics"]["stages"][1]["resumed_at_step"] == killed_at
    assert json.loads(run.read_text())["status"] == "done" and not (run.parent / "checkpoints").exists()

    # The same command, never interrupted, in a fresh home (in this process: no second import cost).
    fresh = new_home(tmp_path / "fresh")
    os.environ["DSFT_HOME"] = str(fresh)
    straight = dsft.train(recipe=str(recipe), checkpoint_every=3)
    assert _outcome(result["metrics"]) == pytest.approx(_outcome(straight.metrics), abs=1e-4)


def test_esft_resumes_mid_stage_with_its_selection_and_optimizer_slices(home, new_home, tmp_path):
    import dsft

    overrides = ["stages.0.steps=12", "stages.0.batch_size=4", "stages.0.seq_len=96", "stages.0.esft.sample_tokens=2048"]

    class Crash(Exception):
        pass

    def crash_at_step_8(kind, payload):
        if kind == "checkpoint" and payload["step"] == 8:
            raise Crash

    with pytest.raises(Crash):
        dsft.train(recipe="esft", overrides=overrides, checkpoint_every=4, on_event=crash_at_step_8)
    resumed = dsft.train(recipe="esft", overrides=overrides, checkpoint_every=4, resume=True)
    assert resumed.metrics["stages"][0]["resumed_at_step"] == 8

    fresh = new_home(tmp_path / "fresh")
    os.environ["DSFT_HOME"] = str(fresh)
    straight = dsft.train(recipe="esft", overrides=overrides, checkpoint_every=4)
    assert resumed.metrics["esft"]["selection"] == straight.metrics["esft"]["selection"]
    assert _outcome(resumed.metrics) == pytest.approx(_outcome(straight.metrics), abs=1e-4)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file() and "bases" not in p.parts}


def _cli(*args: str):
    from dsft.cli.main import app

    return CliRunner().invoke(app, list(args))


def test_a_resume_that_does_not_fit_is_refused_and_writes_nothing(home, tmp_path):
    import dsft

    result = _cli("train", "--max-steps", "2", "--resume")
    assert result.exit_code == 3 and "no unfinished finance run" in result.stderr

    class Crash(Exception):
        pass

    def crash(kind, payload):
        if kind == "checkpoint":
            raise Crash

    with pytest.raises(Crash):  # an unfinished lora run with one checkpoint
        dsft.train(recipe="lora", max_steps=3, checkpoint_every=1, on_event=crash)

    other_base = tmp_path / "other-base"  # the same model with another config: another fingerprint
    shutil.copytree(home / "bases" / "tiny-deepseek-v2", other_base)
    config = json.loads((other_base / "config.json").read_text())
    (other_base / "config.json").write_text(json.dumps({**config, "initializer_range": 0.03}))

    before = _files(home)
    cases = [
        (["--recipe", "two-stage", "--max-steps", "3"], 2, "it ran recipe 'lora', not 'two-stage'; resume with --recipe lora"),
        (["--recipe", "lora", "--max-steps", "3", "stages.0.lr=1e-4"], 2, "had other settings"),
        (["--recipe", "lora", "--max-steps", "4"], 2, "it ran with --max-steps 3, not 4"),
        (["--recipe", "lora", "--max-steps", "3", "--seed", "5"], 2, "seed 0, not 5"),
        (["--recipe", "lora", "--max-steps", "3", "--base", str(other_base)], 2, "it trained base 'tiny-deepseek-v2'"),
        (["--domain", "legal", "--recipe", "lora", "--max-steps", "3"], 3, "no unfinished legal run"),
    ]
    for args, code, message in cases:
        result = _cli("train", *args, "--resume")
        assert result.exit_code == code, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") <= 2, result.stderr  # one (soft-wrapped) line
    assert _files(home) == before, "a refused resume must not write anything"

    ok = dsft.train(recipe="lora", max_steps=3, checkpoint_every=1, resume=True)  # the matching command continues it
    assert ok.metrics["stages"][0]["resumed_at_step"] == 1
