"""SwiGLU MLPs whose gate and up projections carry LoRA, in fewer kernels for the runtime's decode steps.

transformers' ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (DeepSeek-V2's shared experts and dense first layer,
Qwen-MoE's shared expert) is, with the runtime's per-row LoRA on the projections, two ``[W; A]`` GEMMs, two masked
up-projections, the activation and the product before ``down_proj``: here the last four are one kernel
(:meth:`dsft.runtime.multilora.MultiLora.gated_up`). Only modules whose ``forward`` is exactly that code (the same
bytecode) and whose activation is SiLU are patched (none with ``DSFT_TRITON_MLP=0``); a step the kernel does not take
runs the module's own forward.
"""
from __future__ import annotations

import inspect
import os
import types

from torch import nn

from dsft.kernels.expert_lora import is_silu
from dsft.runtime.fused_norms import same_code


def _reference_code() -> types.CodeType | None:
    try:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MLP
    except ImportError:
        return None
    return inspect.unwrap(DeepseekV2MLP.forward).__code__


def patch_mlps(model: nn.Module, lora) -> list[nn.Module]:
    """Give every SwiGLU MLP of ``model`` with transformers' forward the fused one (``lora``: the runtime's
    :class:`~dsft.runtime.multilora.MultiLora`); returns the modules patched, for :func:`restore_mlps`."""
    reference = _reference_code()
    if reference is None or os.environ.get("DSFT_TRITON_MLP", "1") == "0":  # the switch: to compare against it
        return []
    patched = []
    for module in model.modules():
        if (same_code(inspect.unwrap(type(module).forward).__code__, reference) and is_silu(getattr(module, "act_fn", None))
                and all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))):
            module.forward = types.MethodType(_forward(type(module).forward, lora), module)
            patched.append(module)
    return patched


def restore_mlps(modules: list[nn.Module]) -> None:
    for module in modules:
        module.__dict__.pop("forward", None)


def _forward(original, lora):
    def forward(self, x):
        gated = lora.gated_up(self, x)
        return original(self, x) if gated is None else self.down_proj(gated)
    return forward
