"""Two processes train one adapter: `dsft train --num-gpus 2 --device cpu` launches through accelerate with the
generated FSDP2 config, on gloo. The result is the adapter one process trains with the same global batch
(LoRA on attention, shared and routed experts through the fast path, plus term rows), written once, by rank 0;
a run resumed by two processes ends where the uninterrupted single-process run ends."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# The default lora recipe, cut down: 4 steps of a global batch of 4, checkpoints at steps 2 and 4.
TRAIN = ["--domain", "finance", "--max-steps", "4", "--checkpoint-every", "2", "--device", "cpu"]
OVERRIDES = ["stages.0.batch_size=4", "stages.0.seq_len=64"]
REL, ATOL = 1e-5, 5e-5


def run_dsft(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DSFT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "dsft.cli", *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def train_single(home: Path, **kwargs):
    import dsft

    os.environ["DSFT_HOME"] = str(home)
    return dsft.train(domain="finance", max_steps=4, checkpoint_every=2, device="cpu", overrides=OVERRIDES, **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, new_home):
    """The single-process run both tests compare with."""
    home = new_home(tmp_path_factory.mktemp("single"))
    saved = os.environ.get("DSFT_HOME")
    try:
        return train_single(home)
    finally:
        if saved is None:
            os.environ.pop("DSFT_HOME", None)
        else:
            os.environ["DSFT_HOME"] = saved


def assert_same_adapter(a: Path, b: Path) -> None:
    """Equal up to fp32 rounding. Two processes sum the same gradients in another order (last-bit differences);
    Adam divides each element's step by its own gradient's size, so an element whose gradient is near zero can
    carry such a difference into the 1e-5 range. Hence: every tensor within 1e-5 relative to its norm, and no
    element off by anything near one optimizer step (lr 2e-3)."""
    for name in ("adapter_model.safetensors", "terms.safetensors"):
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert x.keys() == y.keys()
        for k in x:
            assert float((x[k] - y[k]).norm() / x[k].norm().clamp(min=1e-12)) < REL, k
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=ATOL, msg=lambda m, k=k: f"{name} {k}: {m}")


def test_two_fsdp_processes_train_the_single_process_adapter_and_write_it_once(home, reference, tiny_base_dir):
    import dsft

    proc = run_dsft(home, "train", *TRAIN, "--num-gpus", "2", "--json", *OVERRIDES)
    result = json.loads(proc.stdout)  # rank 0 alone prints; a second JSON document would fail here
    assert result["adapter"] == "finance@0.1.0"
    assert [a.ref for a in dsft.open_registry().list_adapters("finance")] == ["finance@0.1.0"]
    runs = list((home / "runs").iterdir())
    assert len(runs) == 1 and json.loads((runs[0] / "run.json").read_text())["status"] == "done"
    assert not (runs[0] / "checkpoints").exists()

    assert_same_adapter(Path(result["path"]), reference.path)
    # Logged per step: the global batch's loss (not rank 0's share).
    logged = [json.loads(line)["loss"] for line in (Path(result["path"]) / "train_log.jsonl").read_text().splitlines()]
    expected = [json.loads(line)["loss"] for line in (reference.path / "train_log.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(expected, abs=1e-5)
    assert result["metrics"]["eval_loss_after"] == pytest.approx(reference.metrics["eval_loss_after"], abs=1e-4)
    # Measured on the sharded model before training (each rank loaded only its shard): the whole base's losses
    for key in ("eval_loss_before", "general_loss_before"):
        assert result["metrics"][key] == pytest.approx(reference.metrics[key], abs=1e-4)


def test_two_processes_resume_one_checkpoint_and_end_where_one_process_ends(home, reference, tiny_base_dir):
    class Crash(Exception):
        pass

    def crash_at_step_2(kind, payload):
        if kind == "checkpoint" and payload["step"] == 2:
            raise Crash

    with pytest.raises(Crash):
        train_single(home, on_event=crash_at_step_2)
    proc = run_dsft(home, "train", *TRAIN, "--num-gpus", "2", "--json", "--resume", *OVERRIDES)
    result = json.loads(proc.stdout)
    assert result["metrics"]["stages"][0]["resumed_at_step"] == 2
    assert_same_adapter(Path(result["path"]), reference.path)


# --- what a launch runs (no processes started) -----------------------------------------------------------


def _cli(*args: str):
    from typer.testing import CliRunner

    from dsft.cli.main import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture
def launches(monkeypatch):
    """Record launches instead of starting processes."""
    calls = []
    monkeypatch.setattr("dsft.recipes.launch.launch", lambda config, args, overrides: calls.append((config, args, overrides)) or 0)
    return calls


def test_num_gpus_relaunches_the_same_command_without_the_launch_options(home, tiny_base_dir, launches, tmp_path):
    import yaml

    data = tmp_path / "notes.jsonl"
    data.write_text('{"prompt": "Define EBITDA.", "response": "Earnings before interest, taxes, depreciation and amortisation."}\n')
    result = _cli("train", "--num-gpus", "2", "--device", "cpu", "--max-steps", "3", "--seed", "5", "--no-compile", "-q",
                  "--data", str(data), "stages.0.lr=1e-3")
    assert result.exit_code == 0, result.stderr
    (config, args, overrides), = launches
    assert args == ["--data", str(data), "--seed", "5", "--max-steps", "3", "--device", "cpu", "--no-compile", "--quiet",
                    "stages.0.lr=1e-3"]
    cfg = yaml.safe_load(config.read_text())
    assert config.parent == home / "accelerate" and overrides == {}
    assert (cfg["distributed_type"], cfg["num_processes"]) == ("FSDP", 2)
    assert cfg["fsdp_config"]["fsdp_transformer_layer_cls_to_wrap"] == "DeepseekV2DecoderLayer"
    assert not (home / "runs").exists(), "the launcher itself trains nothing"


def test_a_written_config_edited_and_launched_on_the_second_machine(home, tiny_base_dir, launches, tmp_path):
    import yaml

    path = tmp_path / "fsdp.yaml"
    result = _cli("train", "--num-gpus", "4", "--num-machines", "2", "--main-process-ip", "10.0.0.1", "--write-accelerate-config", str(path))
    assert result.exit_code == 0, result.stderr
    cfg = yaml.safe_load(path.read_text())
    assert (cfg["num_processes"], cfg["num_machines"], cfg["main_process_ip"]) == (8, 2, "10.0.0.1")
    path.write_text(path.read_text().replace("fsdp_offload_params: false", "fsdp_offload_params: true"))
    assert not launches
    result = _cli("train", "--accelerate-config", str(path), "--machine-rank", "1", "--max-steps", "2")
    assert result.exit_code == 0, result.stderr
    (config, args, overrides), = launches
    assert config == path and overrides == {"machine_rank": 1} and args == ["--max-steps", "2"]


def test_deepspeed_without_the_package_is_one_line_saying_how_to_install_it(home, tiny_base_dir):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    result = _cli("train", "--num-gpus", "2", "--backend", "deepspeed", "--device", "cpu")
    assert result.exit_code == 2
    assert "pip install deepspeed" in result.stderr and result.stderr.count("\n") <= 2, result.stderr
    assert not (home / "runs").exists()
