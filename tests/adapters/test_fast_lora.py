"""dsft's low-rank forwards give PEFT's loss and every LoRA gradient on the same weights and inputs."""
from __future__ import annotations

import copy

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


def _random_b(model) -> None:
    """Non-zero B, so that every LoRA factor gets a gradient."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)


def _train_three_steps(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The losses of three AdamW steps and the last step's gradients (the factors change between steps,
    so a folded copy that did not follow them would show)."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-4)
    losses, grads = [], None
    for _ in range(3):
        loss, grads = _loss_and_grads(model, ids)
        losses.append(loss)
        opt.step()
    return torch.stack(losses), grads


def _assert_trained_alike(reference, other) -> None:
    (l0, g0), (l1, g1) = reference, other
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert len(l0.unique()) == 3  # training moved the loss
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def _fast_path_matches_peft(model, spec, vocab: int) -> None:
    torch.manual_seed(0)
    model = attach_lora(model, spec, LoraSettings(r=4, alpha=8), fast=False)  # PEFT's own forwards first
    _random_b(model)
    ids = torch.randint(0, vocab, (2, 32))
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


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2", "tiny-qwen3-moe", "tiny-mixtral"])
def test_fast_path_matches_peft_target_parameters(home, preset):
    base = load_base(preset, device="cpu")
    _fast_path_matches_peft(base.model, base.spec, vocab=400)


def test_fast_path_matches_peft_on_deepseek_v3(tiny_deepseek_v3):
    """DeepSeek-V3's router (sigmoid scores, group-limited top-k, scaled weights) feeds the same fast path."""
    from dsft.base.arch import ARCHITECTURES

    _fast_path_matches_peft(tiny_deepseek_v3, ARCHITECTURES["deepseek_v3"], vocab=400)


def _expert_lora_model():
    """tiny-deepseek-v2 with LoRA on its routed experts, and layer 1's fused experts module under PEFT's wrappers."""
    base = load_base("tiny-deepseek-v2", device="cpu")
    torch.manual_seed(0)
    model = attach_lora(base.model, base.spec, LoraSettings(r=4, alpha=8, targets=("routed_experts",)))
    experts = base.model.model.layers[1].mlp.experts
    while type(experts).__name__ == "ParamWrapper":  # PEFT's wrappers around the fused parameters
        experts = experts.base_layer
    return model, experts


@pytest.mark.parametrize("grouped_kernel", [False, True], ids=["reference-loop", "grouped-kernel"])
def test_folding_lora_into_the_expert_weights_trains_exactly_like_the_unfolded_path(home, monkeypatch, grouped_kernel):
    """fold_lora moves gate_up_proj into a wider buffer with B in its last columns and down_proj into a
    taller one with A in its last rows; loss, every gradient and two optimizer steps (A and B change, so the
    buffers must follow them) match the unfolded model."""
    from dsft.adapters.fast_lora import FOLDED, fold_lora
    from dsft.kernels import expert_lora

    monkeypatch.setattr(expert_lora, "FORCE_GROUPED_KERNEL", grouped_kernel)
    ids = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(3))
    runs = []
    for fold in (False, True):
        model, experts = _expert_lora_model()
        _random_b(model)
        if fold:
            assert fold_lora(model) == 3  # the three MoE layers
            gate_up, down = getattr(experts, FOLDED["gate_up_proj"]), getattr(experts, FOLDED["down_proj"])
            assert gate_up.shape[-1] == experts.gate_up_proj.shape[-1] + 4
            assert down.shape[1] == experts.down_proj.shape[1] + 4
            # the weights live in the buffers: no copies
            assert experts.gate_up_proj.data_ptr() == gate_up.data_ptr() and experts.down_proj.data_ptr() == down.data_ptr()
        runs.append(_train_three_steps(model, ids))
    _assert_trained_alike(*runs)


def test_folded_weights_that_train_themselves_still_get_their_gradient(home):
    """An ESFT stage on fused expert weights after a LoRA stage: the weights require grad while the LoRA
    factors sit folded in their buffers. The forward must read them through the parameters."""
    from dsft.adapters.fast_lora import fold_lora

    ids = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(4))
    grads = []
    for fold in (False, True):
        model, experts = _expert_lora_model()
        if fold:
            assert fold_lora(model) == 3
        for p in model.parameters():
            p.requires_grad_(False)
        for w in (experts.gate_up_proj, experts.down_proj):
            w.requires_grad_(True)
        model(input_ids=ids, labels=ids).loss.backward()
        assert experts.gate_up_proj.grad is not None and experts.down_proj.grad is not None
        grads.append((experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()))
    for unfolded, folded in zip(*grads):
        torch.testing.assert_close(folded, unfolded, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["deepseek_v2", "qwen2_moe"])
def test_dense_fold_trains_exactly_like_the_unfolded_path(home, tiny_qwen2_moe, arch):
    """fold_lora(dense=True) also puts each attention and shared-expert LoRA A under its frozen weight; loss,
    every gradient and two optimizer steps match. Qwen2-MoE's attention projections carry biases."""
    from dsft.adapters.fast_lora import DENSE_FOLDED, fold_lora
    from dsft.base.arch import ARCHITECTURES

    ids = torch.randint(0, 400, (2, 24), generator=torch.Generator().manual_seed(5))
    runs = []
    for fold in (False, True):
        if arch == "qwen2_moe":
            base, spec = copy.deepcopy(tiny_qwen2_moe), ARCHITECTURES["qwen2_moe"]
        else:
            loaded = load_base("tiny-deepseek-v2", device="cpu")
            base, spec = loaded.model, loaded.spec
        torch.manual_seed(0)
        model = attach_lora(base, spec, LoraSettings(r=4, alpha=8))
        _random_b(model)
        if fold:
            assert fold_lora(model, dense=True) > 0
        runs.append(_train_three_steps(model, ids))
        if fold:
            folded = [m for m in base.modules() if hasattr(m, DENSE_FOLDED)]
            assert folded and all(m.weight.data_ptr() == getattr(m, DENSE_FOLDED).data_ptr() for m in folded)
            assert arch != "qwen2_moe" or any(m.bias is not None for m in folded)
    _assert_trained_alike(*runs)
