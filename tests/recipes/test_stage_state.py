"""A stage's optimizer state round-trips through a checkpoint: torch's fused AdamW as on one GPU, and bitsandbytes' 8-bit AdamW."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dsft.recipes.stage_state import optimizer_tensors, restore_optimizer
from dsft.recipes.stages import Entry


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


def test_8bit_adamw_resumes_where_it_stopped():
    """bitsandbytes' AdamW8bit (recipe ``optimizer: adamw8bit``) keeps its moments as uint8 blocks with a scale each
    and its step count as a Python int: all of it goes into the checkpoint as tensors and comes back as it was, so
    the restored optimizer's next step equals the uninterrupted one's, bit for bit."""
    pytest.importorskip("bitsandbytes")
    from dsft.kernels.optim import build_adamw

    torch.manual_seed(0)
    # one tensor past bitsandbytes' 4,096-value floor (8-bit moments), one under it (32-bit moments)
    params = [nn.Parameter(torch.randn(64, 80)), nn.Parameter(torch.randn(8)), nn.Parameter(torch.randn(4096))]
    entries = [Entry(f"p{i}", p, "lora") for i, p in enumerate(params)]
    optimizer = build_adamw([{"params": params, "weight_decay": 0.01}], 1e-2, (0.9, 0.99), "adamw8bit")
    for seed in range(3):
        _step(optimizer, params, seed)
    # through a safetensors file, as a checkpoint holds it (the two 8-bit states' maps are one tensor in memory)
    from safetensors.torch import load, save

    saved = load(save(optimizer_tensors(optimizer, entries, n_experts=1)))
    assert saved["p0/state1"].dtype == torch.uint8 and saved["p1/state1"].dtype == torch.float32
    assert saved["p0/step"].item() == 3
    weights = [p.detach().clone() for p in params]
    _step(optimizer, params, 3)

    resumed = [nn.Parameter(w) for w in weights]
    again = build_adamw([{"params": resumed, "weight_decay": 0.01}], 1e-2, (0.9, 0.99), "adamw8bit")
    restore_optimizer(again, [Entry(f"p{i}", p, "lora") for i, p in enumerate(resumed)], saved, n_experts=1)
    assert again.state[resumed[0]]["step"] == 3 and isinstance(again.state[resumed[0]]["step"], int)
    _step(again, resumed, 3)
    for a, b in zip(resumed, params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
