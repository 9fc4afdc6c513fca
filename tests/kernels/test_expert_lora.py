"""The grouped expert-LoRA math equals merging W + s B A per expert and looping over tokens."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsft.kernels import expert_lora
from dsft.kernels.expert_lora import LowRank, experts_forward, experts_forward_reference, grouped_mm_reference, permute, route, unpermute


def _problem(seed=0, T=37, H=24, I=16, E=6, k=2, r=4):
    """A random routed-experts problem in float64, so only the math (not rounding) can differ."""
    torch.set_default_dtype(torch.float64)
    try:
        return _make(seed, T, H, I, E, k, r)
    finally:
        torch.set_default_dtype(torch.float32)


def _make(seed, T, H, I, E, k, r):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g, requires_grad=True)
    logits = torch.randn(T, E, generator=g)
    w, idx = logits.softmax(-1).topk(k, dim=-1)
    gu = torch.randn(E, 2 * I, H, generator=g) * 0.1
    dn = torch.randn(E, H, I, generator=g) * 0.1
    lora_gu = LowRank(torch.randn(E, r, H, generator=g, requires_grad=True), torch.randn(E, 2 * I, r, generator=g, requires_grad=True), 0.5)
    lora_dn = LowRank(torch.randn(E, r, I, generator=g, requires_grad=True), torch.randn(E, H, r, generator=g, requires_grad=True), 2.0)
    return x, idx, w, gu, dn, lora_gu, lora_dn


def test_routing_sorts_pairs_by_expert():
    idx = torch.tensor([[2, 0], [1, 2], [0, 1]])
    r = route(idx, torch.ones(3, 2), num_experts=4)
    assert r.offs.tolist() == [2, 4, 6, 6]
    assert idx.reshape(-1)[torch.argsort(idx.reshape(-1), stable=True)].tolist() == [0, 0, 1, 1, 2, 2]
    assert (r.order // 2).tolist() == [0, 2, 1, 2, 0, 1]  # the token of each sorted pair


def test_grouped_mm_reference_handles_empty_groups():
    x = torch.randn(5, 3)
    w = torch.randn(3, 3, 2)
    y = grouped_mm_reference(x, w, torch.tensor([2, 2, 5], dtype=torch.int32))
    torch.testing.assert_close(y, torch.cat([x[:2] @ w[0], x[2:] @ w[2]]))


@pytest.mark.parametrize("token_side", [True, False], ids=["token-side", "all-grouped"])
def test_forward_and_every_gradient_match_the_merged_reference(monkeypatch, token_side):
    monkeypatch.setattr(expert_lora, "TOKEN_SIDE_LORA", token_side)
    x, idx, w, gu, dn, lgu, ldn = _problem()
    fast = experts_forward(x, idx, w, gu, dn, F.silu, lgu, ldn)
    tensors = [x, lgu.A, lgu.B, ldn.A, ldn.B]
    grads_fast = torch.autograd.grad(fast.square().sum(), tensors)
    ref = experts_forward_reference(x, idx, w, gu, dn, F.silu, lgu, ldn)
    grads_ref = torch.autograd.grad(ref.square().sum(), tensors)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads_fast, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_without_lora_it_is_the_plain_experts_mlp():
    x, idx, w, gu, dn, _, _ = _problem(seed=1)
    torch.testing.assert_close(experts_forward(x, idx, w, gu, dn, F.silu),
                               experts_forward_reference(x, idx, w, gu, dn, F.silu), rtol=1e-10, atol=1e-10)


def test_permute_and_unpermute_round_trip_and_sum_the_k_choices():
    x = torch.arange(12.0).view(3, 4)
    idx = torch.tensor([[2, 0], [1, 2], [0, 1]])
    r = route(idx, torch.ones(3, 2), num_experts=3)
    xs = permute(x, r, 2)
    torch.testing.assert_close(xs, x[r.order // 2])
    torch.testing.assert_close(unpermute(xs, r, 2), 2 * x)
    assert torch.equal(r.order[r.place], torch.arange(6))  # place: where each flat pair went
    # the gradient of the sum back to each routed row: its token's
    ys = torch.randn(6, 4, requires_grad=True, generator=torch.Generator().manual_seed(0))
    g = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    unpermute(ys, r, 2).backward(g)
    torch.testing.assert_close(ys.grad, g[r.order // 2])


def _folded_problem(seed: int):
    """A problem in fp32 (the grouped kernel's dtype on CPU) with both LoRA factors folded into the expert weights."""
    x, idx, w, gu, dn, lgu, ldn = _problem(seed=seed)
    x, w = x.detach().float().requires_grad_(True), w.float().requires_grad_(True)
    gu, dn = gu.float(), dn.float()
    lgu = LowRank(lgu.A.detach().float().requires_grad_(True), lgu.B.detach().float().requires_grad_(True), lgu.scale)
    ldn = LowRank(ldn.A.detach().float().requires_grad_(True), ldn.B.detach().float().requires_grad_(True), ldn.scale)
    gu_folded = torch.cat([gu, lgu.B.detach()], dim=2)       # [E, 2I, H + r]
    dn_folded = torch.cat([dn, ldn.A.detach()], dim=1)       # [E, H + r, I]
    return x, idx, w, gu, dn, lgu, ldn, gu_folded, dn_folded


def test_folded_path_recomputes_the_activation_and_matches_the_reference_everywhere():
    """With down's A folded into its weight (the training default), gate/up are kept and the SwiGLU output is
    recomputed in backward (:class:`expert_lora._SwigluDown`): the forward and every gradient, the routing
    weights' included, equal the merged reference; and the activation is not among the saved tensors."""
    x, idx, w, gu, dn, lgu, ldn, gu_folded, dn_folded = _folded_problem(seed=3)
    tensors = [x, w, lgu.A, lgu.B, ldn.A, ldn.B]
    saved: list[tuple[int, ...]] = []
    with expert_lora.grouped_kernel_forced(), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        fast = experts_forward(x, idx, w, gu, dn, F.silu, lgu, ldn, gate_up_folded=gu_folded, down_folded=dn_folded)
    grads_fast = torch.autograd.grad(fast.square().sum(), tensors)
    ref = experts_forward_reference(x, idx, w, gu, dn, F.silu, lgu, ldn)
    grads_ref = torch.autograd.grad(ref.square().sum(), tensors)
    for a, b in zip([fast, *grads_fast], [ref, *grads_ref]):  # fp32 rounding, relative to each tensor's scale
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))
    pairs, width = idx.numel(), dn.shape[2]
    assert (pairs, 2 * width) in saved and (pairs, width) not in saved


def test_folded_path_traces_as_one_graph_with_the_same_gradients():
    """dsft train compiles each layer: the recomputing function traces whole (no graph break) through autograd."""
    x, idx, w, gu, dn, lgu, ldn, gu_folded, dn_folded = _folded_problem(seed=4)
    tensors = [x, w, lgu.A, lgu.B, ldn.A, ldn.B]

    def loss(x, w):
        return experts_forward(x, idx, w, gu, dn, F.silu, lgu, ldn, gate_up_folded=gu_folded, down_folded=dn_folded).square().sum()

    with expert_lora.grouped_kernel_forced():
        want = torch.autograd.grad(loss(x, w), tensors)
        got = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(x, w), tensors)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
