"""LoRA reaches attention, shared experts and routed experts on every architecture in the table,
and its output equals the plain model with W + scale * B A merged by hand."""
from __future__ import annotations

import copy

import pytest
import torch

from dsft.adapters.lora import LoraSettings, attach_lora, lora_targets, peft_config, target_shapes
from dsft.base import load_base


def _randomise_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _merged_by_hand(plain, peft_model):
    """The reference: add each LoRA delta to a copy of the plain weights, with plain torch math."""
    merged = copy.deepcopy(plain)
    params = dict(merged.named_parameters())
    for name, module in peft_model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        scale = module.scaling["default"]
        path = name.removeprefix("base_model.model.").replace(".base_layer", "")
        if hasattr(module, "parameter_name"):  # a wrapped nn.Parameter: 2-D (shared expert) or 3-D (routed experts)
            key = path + "." + module.parameter_name if not path.endswith(module.parameter_name) else path
            W = params[key if key in params else path + ".weight"]
            if W.dim() == 3:
                E = W.shape[0]
                a = A.reshape(E, -1, A.shape[-1])          # experts x r x in
                b = B.reshape(B.shape[0], -1, E)           # out x r x experts
                delta = torch.einsum("ore,eri->eoi", b, a) if W.shape[1] == b.shape[0] else torch.einsum("ore,eri->eio", b, a)
            else:
                delta = B @ A
        else:
            W, delta = params[path + ".weight"], B @ A
        with torch.no_grad():
            W += scale * delta.reshape(W.shape)
    return merged


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2", "tiny-qwen3-moe", "tiny-mixtral"])
def test_lora_output_equals_hand_merged_weights(home, preset):
    base = load_base(preset, device="cpu")
    plain = copy.deepcopy(base.model)
    torch.manual_seed(0)
    peft_model = attach_lora(base.model, base.spec, LoraSettings(r=4, alpha=8))
    _randomise_lora(peft_model)
    reference = _merged_by_hand(plain, peft_model)
    ids = torch.randint(0, 400, (2, 24))
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits
        want = reference(input_ids=ids).logits
        untouched = plain(input_ids=ids).logits
    assert not torch.allclose(got, untouched, atol=1e-4), "LoRA changed nothing"
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2", "tiny-qwen3-moe", "tiny-mixtral"])
def test_targets_come_from_the_architecture_table(home, preset):
    base = load_base(preset, device="cpu")
    modules, params = lora_targets(base.model, base.spec, LoraSettings())
    assert any(".self_attn." in m for m in modules)
    assert any(p.endswith("experts.gate_up_proj") for p in params) and any(p.endswith("experts.down_proj") for p in params)
    if base.spec.shared_experts:
        assert any("shared_experts" in p for p in params)
    peft_model = attach_lora(base.model, base.spec, LoraSettings())
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    if base.spec.shared_experts:
        assert any("shared_experts" in n for n in trainable), "shared experts lost their LoRA"


def test_top_layers_restricts_lora_and_shapes_are_recorded(home):
    base = load_base("tiny-deepseek-v2", device="cpu")
    modules, params = lora_targets(base.model, base.spec, LoraSettings(layers=(3,)))
    assert all(".layers.3." in n for n in modules + params)
    shapes = target_shapes(base.model, peft_config(base.model, base.spec, LoraSettings(layers=(3,))))
    assert shapes["model.layers.3.mlp.experts.gate_up_proj"] == list(base.model.model.layers[3].mlp.experts.gate_up_proj.shape)
