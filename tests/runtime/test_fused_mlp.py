"""SwiGLU MLPs with transformers' forward get the runtime's fused one (and give it back); other MLPs keep theirs, and
a step the fused path does not take (here: none does) computes what transformers computes."""
from __future__ import annotations

import torch
from transformers import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MLP
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP

from dsft.runtime.fused_mlp import patch_mlps, restore_mlps


class NoFusion:
    """A runtime with no LoRA on the projections: ``gated_up`` declines."""

    def __init__(self):
        self.asked = 0

    def gated_up(self, mlp, x):
        self.asked += 1
        return None


def test_swiglu_mlps_are_patched_and_given_back(monkeypatch):
    config = DeepseekV2Config(hidden_size=32, intermediate_size=48, hidden_act="silu")
    silu = DeepseekV2MLP(config)
    gelu = DeepseekV2MLP(DeepseekV2Config(hidden_size=32, intermediate_size=48, hidden_act="gelu"))
    qwen = Qwen2MoeMLP(config, intermediate_size=40)  # the same forward code: patched too
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0))
    want = silu(x)
    runtime = NoFusion()
    assert patch_mlps(torch.nn.Sequential(silu, gelu, qwen), runtime) == [silu, qwen]
    torch.testing.assert_close(silu(x), want, rtol=0, atol=0)  # declined: transformers' own forward ran
    assert runtime.asked == 1 and "forward" not in gelu.__dict__
    restore_mlps([silu, qwen])
    assert "forward" not in silu.__dict__ and "forward" not in qwen.__dict__
    monkeypatch.setenv("DSFT_TRITON_MLP", "0")  # switched off: nothing patched
    assert patch_mlps(torch.nn.Sequential(silu, qwen), runtime) == []
