"""The runtime's RMSNorms in fewer kernels compute what transformers' do, and come off again."""
from __future__ import annotations

import importlib

import pytest
import torch

from dsft.runtime.fused_norms import fuse_rms_norms, restore_norms

NORMS = [("deepseek_v2", "DeepseekV2RMSNorm"), ("deepseek_v3", "DeepseekV3RMSNorm"), ("qwen2_moe", "Qwen2MoeRMSNorm"),
         ("qwen3_moe", "Qwen3MoeRMSNorm"), ("mixtral", "MixtralRMSNorm"), ("olmoe", "OlmoeRMSNorm")]


@pytest.mark.parametrize("model_type,name", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_norm_equals_transformers(model_type, name, dtype):
    cls = getattr(importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}"), name)
    norm = cls(64, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0)) * 4).to(dtype)
    want = norm(x)
    assert fuse_rms_norms(norm) == [norm]
    torch.testing.assert_close(norm(x), want, rtol=1e-6 if dtype == torch.float32 else 0, atol=1e-6 if dtype == torch.float32 else 0)
    restore_norms([norm])
    assert "forward" not in norm.__dict__


def test_other_norms_keep_their_forward():
    class ShiftedNorm(torch.nn.Module):  # Gemma's kind: (1 + weight), not transformers' Llama math
        def __init__(self):
            super().__init__()
            self.weight, self.variance_epsilon = torch.nn.Parameter(torch.zeros(8)), 1e-6

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * (1 + self.weight)

    assert fuse_rms_norms(torch.nn.Sequential(ShiftedNorm(), torch.nn.LayerNorm(8))) == []


def test_runtime_fuses_the_norms_and_gives_them_back(rt_home):
    from dsft.runtime import load_base

    base = load_base("tiny-qwen3-moe")
    norms = [m for m in base.model.modules() if type(m).__name__.endswith("RMSNorm")]
    base.generate("The bond", raw=True, max_new_tokens=2)
    assert norms and all("forward" in m.__dict__ for m in norms)  # q_norm and k_norm too
    base.close()
    assert not any("forward" in m.__dict__ for m in norms)
