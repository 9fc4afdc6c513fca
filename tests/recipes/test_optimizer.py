"""The recipe's ``optimizer`` (``dsft train --optimizer``): torch's AdamW by default, bitsandbytes' 8-bit AdamW when
asked, for LoRA and ESFT stages, recorded with the adapter; refused in one line where it cannot run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dsft.cli.main import app
from dsft.errors import UsageError
from dsft.recipes.run_checks import check_optimizer
from dsft.recipes.schema import load_recipe

pytest.importorskip("bitsandbytes")


def _train_8bit(*args: str) -> dict:
    """``dsft train --optimizer adamw8bit ARGS --json``: its result, after checking the adapter learned something."""
    result = CliRunner().invoke(app, ["train", "--optimizer", "adamw8bit", *args, "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["metrics"]["eval_loss_after"] < out["metrics"]["eval_loss_before"]
    return out


def test_train_with_8bit_adamw_from_the_cli(home):
    # checkpoints every 2 steps: the 8-bit moments go into safetensors files too
    out = _train_8bit("--domain", "finance", "--max-steps", "4", "--checkpoint-every", "2")
    assert "optimizer: adamw8bit" in (Path(out["path"]) / "recipe.yaml").read_text()


def test_esft_trains_its_expert_slices_with_8bit_adamw(home):
    _train_8bit("--domain", "legal", "--recipe", "esft", "--max-steps", "3")


def test_an_unknown_optimizer_is_one_line_naming_the_choices(home):
    result = CliRunner().invoke(app, ["train", "--optimizer", "sgd", "--max-steps", "1"])
    assert result.exit_code != 0
    assert "optimizer: must be one of 'adamw' | 'adamw8bit', got 'sgd'" in result.stderr
    assert "Traceback" not in result.stderr


def test_8bit_adamw_is_refused_with_fsdp_sharding_and_fine_otherwise():
    assert load_recipe("lora", ["optimizer=adamw8bit"]).optimizer == "adamw8bit"
    assert load_recipe("lora").optimizer == "adamw"
    with pytest.raises(UsageError, match="--backend ddp"):
        check_optimizer("adamw8bit", "fsdp")
    for sharding in ("none", "ddp"):
        check_optimizer("adamw8bit", sharding)
    check_optimizer("adamw", "fsdp")
