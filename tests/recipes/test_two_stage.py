"""The two-stage recipe: stage 1 trains only the top third of the layers' LoRA (and the term rows),
stage 2 all layers, starting from stage 1's weights; both stages show in the metrics and the log."""
from __future__ import annotations

from safetensors.torch import load_file

from dsft.eval.logs import read_training_log


def test_two_stage_runs_cpt_then_sft_and_lowers_domain_loss(home):
    import dsft

    result = dsft.train(domain="finance", recipe="two-stage", max_steps=8)
    stages = result.metrics["stages"]
    assert [s["stage"] for s in stages] == ["cpt", "sft"]
    assert stages[0]["mixture"] == {"domain.raw": 64}  # the realised mixture of the 8 capped steps x batch 8
    assert result.metrics["eval_loss_after"] < result.metrics["eval_loss_before"]
    assert {r["stage"] for r in read_training_log(result.path)} == {"cpt", "sft"}
    # every layer's LoRA moved (stage 2 trains all of them); B starts at zero, so non-zero means trained
    weights = load_file(str(result.path / "adapter_model.safetensors"))
    for layer in range(4):
        assert any(f"layers.{layer}." in k and "lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())


def test_stage_one_leaves_the_lower_layers_untouched(home):
    import dsft

    result = dsft.train(domain="finance", recipe="two-stage", overrides=["stages.1.train.top_layers=0.34"], max_steps=3)
    weights = load_file(str(result.path / "adapter_model.safetensors"))
    lower = [v for k, v in weights.items() if "lora_B" in k and ("layers.0." in k or "layers.1." in k)]
    upper = [v for k, v in weights.items() if "lora_B" in k and "layers.3." in k]
    assert lower and all(v.abs().sum() == 0 for v in lower)
    assert any(v.abs().sum() > 0 for v in upper)
