"""dsft's low-rank forwards give PEFT's loss and every LoRA gradient on the same weights and inputs."""
from __future__ import annotations

import pytest
import torch

from dsft.adapters.fast_lora import disable_fast_lora, enable_fast_lora
from dsft.adapters.lora import LoraSettings, attach_lora
from dsft.base import load_base


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2", "tiny-qwen3-moe", "tiny-mixtral"])
def test_fast_path_matches_peft_target_parameters(home, preset):
    base = load_base(preset, device="cpu")
    torch.manual_seed(0)
    model = attach_lora(base.model, base.spec, LoraSettings(r=4, alpha=8))
    with torch.no_grad():  # non-zero B so that every LoRA factor gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    ids = torch.randint(0, 400, (2, 32))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    n = enable_fast_lora(model)
    assert n >= 3, "routed experts (and shared experts where present) should be on the fast path"
    loss_fast, grads_fast = _loss_and_grads(model, ids)
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads_fast.keys() == grads_ref.keys()
    for name in grads_ref:
        rel = (grads_fast[name] - grads_ref[name]).norm() / grads_ref[name].norm().clamp(min=1e-12)
        assert rel < 1e-5, f"{name}: relative error {rel:.2e}"
    disable_fast_lora(model)
    torch.testing.assert_close(_loss_and_grads(model, ids)[0], loss_ref)
