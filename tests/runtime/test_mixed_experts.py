"""The mixed-adapter routed-experts forward against the plain reference, token by token."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsft.kernels.expert_lora import LowRank, experts_forward_reference
from dsft.runtime.multilora import experts_forward_mixed


def _lowrank(g, E, out, inp, r=4):
    return LowRank(torch.randn(E, r, inp, generator=g) * 0.3, torch.randn(E, out, r, generator=g) * 0.3, 1.5)


def test_each_token_gets_its_own_adapters_experts():
    g = torch.Generator().manual_seed(0)
    T, H, I, E, k = 24, 16, 8, 6, 2
    x = torch.randn(T, H, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g) * 0.2, torch.randn(E, H, I, generator=g) * 0.2
    a = (_lowrank(g, E, 2 * I, H), _lowrank(g, E, H, I))
    b = (_lowrank(g, E, 2 * I, H), None)  # an adapter on gate_up only
    owner = torch.tensor([i % 3 for i in range(T)])  # 0 = adapter a, 1 = adapter b, 2 = no adapter
    got = experts_forward_mixed(x, index, weights, gate_up, down, F.silu,
                                [(*a, owner == 0), (*b, owner == 1)])
    for who, lora in ((0, a), (1, b), (2, (None, None))):
        rows = owner == who
        want = experts_forward_reference(x[rows], index[rows], weights[rows], gate_up, down, F.silu, *lora)
        torch.testing.assert_close(got[rows], want, rtol=1e-5, atol=1e-5)
