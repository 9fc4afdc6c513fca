"""A stage's optimizer state round-trips through a checkpoint, with torch's fused AdamW as on one GPU."""
from __future__ import annotations

import torch
from torch import nn

from dsft.recipes.stages import Entry, optimizer_tensors, restore_optimizer


def _step(optimizer, params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    optimizer.step()


def test_fused_adamw_resumes_where_it_stopped():
    """torch's fused AdamW keeps its step counts on the parameters' device as float32 (CPU here; the same
    kernel family runs on CUDA): a restored optimizer's next step equals the uninterrupted one's."""
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(8))]
    entries = [Entry(f"p{i}", p, "lora") for i, p in enumerate(params)]
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=True)
    for seed in range(3):
        _step(optimizer, params, seed)
    saved = {k: v.clone() for k, v in optimizer_tensors(optimizer, entries, n_experts=1).items()}
    weights = [p.detach().clone() for p in params]
    _step(optimizer, params, 3)

    resumed = [nn.Parameter(w) for w in weights]
    again = torch.optim.AdamW(resumed, lr=1e-2, fused=True)
    restore_optimizer(again, [Entry(f"p{i}", p, "lora") for i, p in enumerate(resumed)], saved, n_experts=1)
    _step(again, resumed, 3)
    for a, b in zip(resumed, params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
