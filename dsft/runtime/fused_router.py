"""DeepSeek-V2's greedy router in two kernels in the runtime's decode steps (:mod:`dsft.kernels.router`; on unless
``DSFT_TRITON_ROUTER=0``).

Only modules whose ``forward`` is exactly transformers' ``DeepseekV2TopkRouter.forward`` (the same bytecode) with
``topk_method == "greedy"`` (DeepSeek-V2 and V2-Lite) are patched; a step with more tokens than the kernels take, or
off a GPU, runs transformers' own code.
"""
from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from dsft.kernels import moe_gemm, router
from dsft.runtime.fused_norms import same_code


def _reference_code() -> types.CodeType | None:
    try:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    except ImportError:
        return None
    return inspect.unwrap(DeepseekV2TopkRouter.forward).__code__


def patch_routers(model: nn.Module) -> list[nn.Module]:
    """Give every greedy DeepSeek-V2 router of ``model`` the kernels' forward (none unless :func:`router.wanted`);
    returns the modules patched, for :func:`restore_routers`."""
    reference = _reference_code()
    if reference is None or not router.wanted():
        return []
    patched = []
    for module in model.modules():
        if (same_code(inspect.unwrap(type(module).forward).__code__, reference)
                and getattr(module, "topk_method", None) == "greedy"):
            module.forward = types.MethodType(_forward(type(module).forward), module)
            patched.append(module)
    return patched


def restore_routers(modules: list[nn.Module]) -> None:
    for module in modules:
        module.__dict__.pop("forward", None)


def _forward(original):
    def forward(self, hidden_states: torch.Tensor):
        x = hidden_states.view(-1, self.hidden_dim)
        if router.usable(x, self.num_experts):
            out = moe_gemm.or_none(router.greedy_route, x, self.weight, self.top_k, self.routed_scaling_factor)
            if out is not None:
                return out
        return original(self, hidden_states)
    return forward
