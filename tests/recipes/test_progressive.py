"""The progressive recipe: a data curriculum with general replay, and LoRA unfrozen from the top layers down."""
from __future__ import annotations

import json

from safetensors.torch import load_file


def test_curriculum_phases_replay_and_top_down_unfreezing(home):
    import dsft

    # 20 steps: general 10, domain 6, long tail 4; the schedule stops at two thirds of the layers, so the
    # bottom layer's LoRA never trains and layer 1 only joins at step 10.
    result = dsft.train(recipe="progressive", overrides=["stages.0.steps=20", "stages.0.batch_size=4",
                                                         "stages.0.train.unfreeze.2.top_layers=0.67"])
    stage = result.metrics["stages"][0]
    phases = stage["phases"]
    assert {k: v["steps"] for k, v in phases.items()} == {"general": 10, "domain": 6, "longtail": 4}
    assert phases["general"]["mixture"] == {"general.raw": 40}
    assert phases["domain"]["mixture"] == {"domain.raw": 10, "domain.instruct": 9, "general.raw": 5}  # 20% replay
    assert phases["longtail"]["mixture"]["general.raw"] == 3 and phases["longtail"]["mixture"]["domain.longtail"] > 0
    assert stage["mixture"]["general.raw"] == 48  # the realised mixture over the whole stage is logged too
    assert result.metrics["eval_loss_after"] < result.metrics["eval_loss_before"]

    weights = load_file(str(result.path / "adapter_model.safetensors"))
    moved = {layer: any(f"layers.{layer}." in k and "lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())
             for layer in range(4)}
    assert moved == {0: False, 1: True, 2: True, 3: True}
    stage_json = next(home.glob("runs/finance-*/stages/0-curriculum/stage.json"))
    assert json.loads(stage_json.read_text())["phases"] == phases
