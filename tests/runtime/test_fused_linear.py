"""A LoRA linear with A under W in one buffer computes the three-GEMM result, and gives W back whole."""
from __future__ import annotations

import torch
from torch import nn

from dsft.runtime.fused_linear import FusedWeights, fused_lora_linear


def _case(bias: bool):
    g = torch.Generator().manual_seed(0)
    module = nn.Linear(12, 10, bias=bias)
    A, B = torch.randn(6, 12, generator=g), torch.randn(10, 6, generator=g)
    x = torch.randn(3, 4, 12, generator=g)
    mask = (torch.rand(12, 6, generator=g) > 0.5).float()
    return module, A, B, x, mask


def test_fused_equals_three_gemms_and_weight_is_shared():
    for bias in (False, True):
        module, A, B, x, mask = _case(bias)
        w = module.weight.detach().clone()
        want = module(x) + ((x @ A.T) * mask.view(3, 4, 6)) @ B.T
        fused = FusedWeights()
        f = fused.get("q", module, A, version=1)
        assert f is not None and module.weight.data_ptr() == f.stacked.data_ptr()  # W is not copied twice
        torch.testing.assert_close(fused_lora_linear(x, f, B, mask), want)
        torch.testing.assert_close(fused_lora_linear(x, f, B, None), module(x) + (x @ A.T) @ B.T)
        assert fused.get("q", module, A, version=1) is f
        A2 = torch.randn(2, 12)
        f2 = fused.get("q", module, A2, version=2)  # adapters changed: rebuilt from the weight's view
        assert f2 is not f and f2.stacked.shape == (12, 12)
        torch.testing.assert_close(module.weight, w)
        fused.release("q", module)
        assert module.weight.untyped_storage().nbytes() == w.numel() * w.element_size()
        torch.testing.assert_close(module.weight, w)


def test_other_dtypes_are_not_fused():
    module, A, _, _, _ = _case(False)
    assert FusedWeights().get("q", module, A.double(), version=1) is None
