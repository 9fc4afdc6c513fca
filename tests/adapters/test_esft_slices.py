"""ESFT's selected experts trained as parameters of their own: the same gradients and updates as masking
the fused tensors, with gradients and AdamW state only the selected experts' size."""
from __future__ import annotations

import pytest
import torch

from dsft.adapters.esft import expert_grad_mask, expert_parameters, trained_slices
from dsft.adapters.esft_slices import trainable_slices
from dsft.kernels import expert_lora

EPS = 1e-4  # AdamW's default 1e-8 turns last-bit differences of near-zero gradients into lr-sized steps
SELECTION = {1: (2,), 2: (1, 7), 3: (0, 3, 6)}  # experts the test tokens reach


@pytest.fixture
def tiny(home):
    from dsft.base import load_base

    return load_base("tiny-deepseek-v2", device="cpu")


def _ids(seed=0):
    return torch.randint(0, 4000, (4, 32), generator=torch.Generator().manual_seed(seed))


def _masked_reference(model, spec, ids, steps, lr=1e-2):
    """The plain way: the fused tensors train, their gradients zeroed outside the selected experts."""
    params = expert_parameters(model, spec, SELECTION)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p, _, _ in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW([p for _, p, _, _ in params], lr=lr, weight_decay=0.0, eps=EPS)
    grads = {}
    with expert_grad_mask(params, 8):
        for _ in range(steps):
            model(input_ids=ids, labels=ids).loss.backward()
            grads = {name: p.grad[idx].clone() for name, p, idx, _ in params}
            opt.step()
            opt.zero_grad()
    for _, p, _, _ in params:
        p.requires_grad_(False)
    return grads


def _sliced(model, spec, ids, steps, lr=1e-2):
    for p in model.parameters():
        p.requires_grad_(False)
    grads, state_shapes = {}, set()
    with trainable_slices(model, spec, SELECTION) as slices:
        opt = torch.optim.AdamW([s.param for s in slices], lr=lr, weight_decay=0.0, eps=EPS)
        for _ in range(steps):
            model(input_ids=ids, labels=ids).loss.backward()
            grads = {s.name: s.param.grad.clone() for s in slices}
            opt.step()
            opt.zero_grad()
        state_shapes = {tuple(v.shape) for st in opt.state.values() for v in st.values() if v.dim()}
        during = trained_slices(model, spec, SELECTION)  # read while the slots are permuted
    return grads, state_shapes, during


@pytest.mark.parametrize("grouped_kernel", [False, True], ids=["reference-loop", "grouped-kernel"])
def test_slices_train_exactly_like_masked_fused_weights(tiny, monkeypatch, grouped_kernel):
    from dsft.base import load_base

    monkeypatch.setattr(expert_lora, "FORCE_GROUPED_KERNEL", grouped_kernel)
    ids = _ids()
    ref = load_base("tiny-deepseek-v2", device="cpu")
    ref.model.train()
    tiny.model.train()
    want = _masked_reference(ref.model, ref.spec, ids, steps=3)
    got, state_shapes, during = _sliced(tiny.model, tiny.spec, ids, steps=3)

    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-7)
    # AdamW's moments are the selected experts' size: [S, out, in], never [8, out, in].
    assert all(shape[0] in (1, 2, 3) for shape in state_shapes) and state_shapes
    # Back in expert order, both models hold the same weights, selected experts trained, the rest untouched.
    base = load_base("tiny-deepseek-v2", device="cpu").model
    for (name, p), (_, q) in zip(tiny.model.named_parameters(), ref.model.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    after = trained_slices(tiny.model, tiny.spec, SELECTION)
    for key, value in after.items():
        torch.testing.assert_close(during[key], value, rtol=0, atol=0)  # the permuted state reads the same experts
    for layer, experts in SELECTION.items():
        w, w0 = tiny.model.model.layers[layer].mlp.experts.gate_up_proj, base.model.layers[layer].mlp.experts.gate_up_proj
        others = [e for e in range(8) if e not in experts]
        assert torch.equal(w.detach()[others], w0.detach()[others])
        grad = got[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        for s, e in enumerate(experts):  # a selected expert moved iff tokens reached it
            assert torch.equal(w.detach()[e], w0.detach()[e]) == (grad[s].abs().sum() == 0)
    assert all(g.abs().sum() > 0 for g in got.values())


def test_slices_share_the_fused_storage_and_the_model_is_restored_on_exit(tiny):
    model, spec = tiny.model, tiny.spec
    experts = model.model.layers[2].mlp.experts
    before = experts.gate_up_proj.detach().clone()
    with trainable_slices(model, spec, SELECTION) as slices:
        head = next(s for s in slices if s.name.endswith("layers.2.mlp.experts.gate_up_proj"))
        assert head.param.shape == (2, *before.shape[1:]) and head.index.tolist() == [1, 7]
        assert head.param.data_ptr() == experts.gate_up_proj.data_ptr()  # no copy: the optimizer updates the model
        assert torch.equal(head.param.detach(), before[[1, 7]])
        assert torch.equal(experts.gate_up_proj.detach()[2:], before[[0, 2, 3, 4, 5, 6]])  # the rest in order
        with torch.no_grad():
            logits = model(input_ids=_ids(1)).logits
    assert "forward" not in experts.__dict__ and not hasattr(experts, "dsft_slot")
    assert torch.equal(experts.gate_up_proj.detach(), before)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids(1)).logits, logits, rtol=1e-5, atol=1e-5)


def test_slices_are_restored_when_training_fails(tiny):
    experts = tiny.model.model.layers[1].mlp.experts
    before = experts.down_proj.detach().clone()
    with pytest.raises(RuntimeError, match="boom"), trainable_slices(tiny.model, tiny.spec, SELECTION):
        raise RuntimeError("boom")
    assert torch.equal(experts.down_proj.detach(), before) and "forward" not in experts.__dict__


def test_layers_compiled_before_the_slices_run_the_sliced_forward(tiny):
    """dsft train compiles the layers before an ESFT stage scores (and so runs) them: the compiled layers
    must pick up the patched experts forward and the permuted weights, not keep the first graph."""
    from dsft.base import load_base

    model = tiny.model
    for layer in model.model.layers:
        layer.compile(backend="eager")  # dynamo's tracing and guards, without inductor's compile time
    ids = _ids(2)
    with torch.no_grad():
        model(input_ids=ids)  # the first graph: stock experts forward, expert order
        with trainable_slices(model, tiny.spec, SELECTION):
            for head in model.model.layers[2].mlp.experts.dsft_heads:
                head.mul_(3)  # train experts 1 and 7 of layer 2, in effect
            got = model(input_ids=ids).logits
        ref = load_base("tiny-deepseek-v2", device="cpu").model
        for pname in ("gate_up_proj", "down_proj"):
            getattr(ref.model.layers[2].mlp.experts, pname)[[1, 7]] *= 3
        torch.testing.assert_close(got, ref(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model(input_ids=ids).logits, got, rtol=1e-4, atol=1e-4)  # restored, values kept


def test_deepseek_v3_group_limited_routing_is_untouched_by_the_slot_permutation(tiny_deepseek_v3):
    """V3 routes within groups of consecutive experts; the slices permute the experts' storage, not the
    router, so the model computes the same function while the slices are active and after."""
    from dsft.base.arch import ARCHITECTURES

    model, spec = tiny_deepseek_v3, ARCHITECTURES["deepseek_v3"]
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(1))
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    with trainable_slices(model, spec, {1: (5, 2), 2: (7,)}) as slices:
        assert [tuple(s.param.shape[:1]) for s in slices] == [(2,), (2,), (1,), (1,)]
        with torch.no_grad():
            during = model(input_ids=ids).logits
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(s.param.grad is not None and s.param.grad.abs().sum() > 0 for s in slices)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    torch.testing.assert_close(during, before, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
