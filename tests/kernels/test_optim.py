"""``fused_adamw_ok``: torch's fused AdamW for plain CUDA tensors only."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dsft.kernels.optim import fused_adamw_ok


def _cuda_param():
    """A real CUDA parameter where there is a GPU; elsewhere a stand-in that answers ``is_cuda`` as one does
    (the decision reads nothing else of a plain tensor)."""
    if torch.cuda.is_available():
        return nn.Parameter(torch.zeros(2, device="cuda"))
    return SimpleNamespace(is_cuda=True)


def test_plain_cuda_tensors_get_the_fused_optimizer():
    assert fused_adamw_ok([_cuda_param(), _cuda_param()])


def test_cpu_tensors_a_mix_and_nothing_keep_the_default():
    cpu = nn.Parameter(torch.zeros(2))
    assert not fused_adamw_ok([cpu])  # CPU runs keep torch's default AdamW
    assert not fused_adamw_ok([_cuda_param(), cpu])  # one fused kernel needs every tensor on the GPU
    assert not fused_adamw_ok([])


def test_8bit_adamw_keeps_a_quarter_of_the_moment_bytes_and_follows_adamw():
    """``adamw8bit``: each moment one byte a value (plus a scale per 256), against AdamW's fp32 four; over a few
    steps on the same gradients the weights stay within the moments' rounding of torch's AdamW."""
    pytest.importorskip("bitsandbytes")
    from dsft.kernels.optim import build_adamw

    torch.manual_seed(0)
    start = torch.randn(256, 64)
    exact, small = nn.Parameter(start.clone()), nn.Parameter(start.clone())
    ref = build_adamw([{"params": [exact], "weight_decay": 0.0}], 1e-3, (0.9, 0.99), "adamw")
    opt = build_adamw([{"params": [small], "weight_decay": 0.0}], 1e-3, (0.9, 0.99), "adamw8bit")
    g = torch.Generator().manual_seed(1)
    for _ in range(10):
        grad = torch.randn(start.shape, generator=g)
        exact.grad, small.grad = grad.clone(), grad.clone()
        ref.step()
        opt.step()
    moved = (exact - start).abs().mean()
    assert (small - exact).abs().mean() < 0.05 * moved  # the same updates, up to the moments' rounding
    state = opt.state[small]
    moment_bytes = sum(state[k].numel() * state[k].element_size() for k in ("state1", "state2", "absmax1", "absmax2"))
    assert moment_bytes == 2 * start.numel() * (1 + 4 / 256)  # what dsft plan counts (dsft/eval/plan.py)


def test_an_unknown_optimizer_is_refused_by_name():
    from dsft.errors import UsageError
    from dsft.kernels.optim import build_adamw

    with pytest.raises(UsageError, match="adamw or adamw8bit, got 'sgd'"):
        build_adamw([{"params": [nn.Parameter(torch.zeros(2))], "weight_decay": 0.0}], 1e-3, (0.9, 0.99), "sgd")


def test_dsfts_8bit_step_updates_exactly_as_bitsandbytes_own_without_waiting_for_the_gpu(monkeypatch):
    """dsft's AdamW8bit step leaves out bitsandbytes' device synchronisation after every tensor; the updates are
    the library's own, so weights and moments equal its step's bit for bit (CPU here; the same calls on a GPU)."""
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.optim.optimizer as bnb_optimizer

    from dsft.kernels.optim import build_adamw

    syncs = []
    monkeypatch.setattr(bnb_optimizer, "sync_gpu", lambda t: syncs.append(t))
    torch.manual_seed(0)
    shapes = [(64, 80), (8,), (4096,)]  # 8-bit, 32-bit (under 4,096 values), 8-bit
    ours = [nn.Parameter(torch.randn(s)) for s in shapes]
    theirs = [nn.Parameter(p.detach().clone()) for p in ours]
    mine = build_adamw([{"params": ours[:2], "weight_decay": 0.01}, {"params": ours[2:], "weight_decay": 0.0}],
                       1e-2, (0.9, 0.99), "adamw8bit")
    ref = bnb.optim.AdamW8bit([{"params": theirs[:2], "weight_decay": 0.01}, {"params": theirs[2:], "weight_decay": 0.0}],
                              lr=1e-2, betas=(0.9, 0.99))
    assert type(mine) is not bnb.optim.AdamW8bit and isinstance(mine, bnb.optim.AdamW8bit)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        if step == 2:  # a tensor without a gradient this step is left alone
            ours[1].grad = theirs[1].grad = None
        before = len(syncs)
        mine.step()
        assert len(syncs) == before  # dsft's step: no synchronisation
        ref.step()
        assert len(syncs) > before  # bitsandbytes' own: one per tensor
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        for key, value in ref.state[b].items():
            got = mine.state[a][key]
            assert got == value if isinstance(value, int) else torch.equal(got, value), key
