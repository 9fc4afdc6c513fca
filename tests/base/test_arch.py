"""``supports_fused_experts``: the one question ESFT slices, fast expert LoRA and the runtime ask of an experts module."""
from __future__ import annotations

import torch

from dsft.base.arch import supports_fused_experts


def test_transformers_fused_experts_are_supported_and_other_layouts_are_not(tiny_qwen2_moe):
    experts = tiny_qwen2_moe.model.layers[0].mlp.experts
    assert supports_fused_experts(experts)
    experts.is_transposed = True  # [E, H, 2I]: our kernels read [E, 2I, H]
    assert not supports_fused_experts(experts)
    experts.is_transposed = False
    experts.gate_up_proj_bias = torch.nn.Parameter(torch.zeros(experts.gate_up_proj.shape[:2]))
    assert not supports_fused_experts(experts)
    assert not supports_fused_experts(tiny_qwen2_moe.model.layers[0].self_attn)
