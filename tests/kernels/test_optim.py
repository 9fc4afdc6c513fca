"""``fused_adamw_ok``: torch's fused AdamW for plain CUDA tensors only."""
from __future__ import annotations

from types import SimpleNamespace

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
