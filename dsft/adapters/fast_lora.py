"""Swap PEFT's ``target_parameters`` forwards for low-rank ones, keeping PEFT's parameters and files.

PEFT wraps a targeted ``nn.Parameter`` in a ``ParamWrapper`` that, on every forward, forms W + s B A
and runs the original module with it. That costs a full copy of W per step and, in backward, a full
weight-gradient GEMM for the copy. Here the same wrappers keep their ``lora_A``/``lora_B``
parameters (so saving, loading and PEFT compatibility are untouched), but their forward computes
the low-rank path on the activations instead:

* routed experts (the nested wrappers of ``gate_up_proj`` and ``down_proj``): one fused pass,
  :func:`dsft.kernels.expert_lora.experts_forward`, grouped GEMMs on the routed tokens;
* 2-D parameters (shared experts): ``x W^T + s (x A^T) B^T``.

PEFT's layout for a 3-D parameter W [E, out, in]: ``lora_A.weight`` is [E*r, in] (viewed E x r x in),
``lora_B.weight`` is [out, r*E] (viewed out x r x E), delta_e = B[:, :, e] @ A[e].
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from dsft.kernels.expert_lora import LowRank, experts_forward

ADAPTER = "default"


def _is_param_wrapper(module: nn.Module) -> bool:
    return type(module).__name__ == "ParamWrapper"


def _chain(wrapper: nn.Module) -> tuple[dict[str, nn.Module], nn.Module]:
    """The nested wrappers by parameter name, and the wrapped module at the bottom."""
    by_param, module = {}, wrapper
    while _is_param_wrapper(module):
        by_param[module.parameter_name] = module
        module = module.base_layer
    return by_param, module


def _active(wrapper: nn.Module) -> bool:
    return ADAPTER in wrapper.lora_A and not wrapper.disable_adapters and not wrapper.merged and ADAPTER in wrapper.active_adapters


def _expert_lowrank(wrapper: nn.Module | None, weight: torch.Tensor) -> LowRank | None:
    if wrapper is None or not _active(wrapper):
        return None
    n_experts, out_features, in_features = weight.shape
    A = wrapper.lora_A[ADAPTER].weight
    B = wrapper.lora_B[ADAPTER].weight
    r = A.shape[0] // n_experts
    # B is stored expert-minor; grouped GEMMs need each expert's [out, r] block contiguous (a few MB copy).
    return LowRank(A.view(n_experts, r, in_features), B.view(out_features, r, n_experts).permute(2, 0, 1).contiguous(),
                   wrapper.scaling[ADAPTER])


def _fast_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    by_param, experts = _chain(self)
    return experts_forward(
        hidden_states, top_k_index, top_k_weights, experts.gate_up_proj, experts.down_proj, experts.act_fn,
        _expert_lowrank(by_param.get("gate_up_proj"), experts.gate_up_proj),
        _expert_lowrank(by_param.get("down_proj"), experts.down_proj),
    )


def _fast_linear_forward(self, x, *args, **kwargs):
    base = self.base_layer
    y = F.linear(x, base.weight, base.bias)
    if _active(self):
        A, B = self.lora_A[ADAPTER].weight, self.lora_B[ADAPTER].weight
        y = y + self.scaling[ADAPTER] * F.linear(F.linear(x.to(A.dtype), A), B).to(y.dtype)
    return y


def _outermost_wrappers(model: nn.Module) -> list[nn.Module]:
    wrappers = [m for m in model.modules() if _is_param_wrapper(m)]
    inner = {id(m.base_layer) for m in wrappers}
    return [m for m in wrappers if id(m) not in inner]


def enable_fast_lora(model: nn.Module) -> int:
    """Patch every supported ParamWrapper of ``model`` (a PeftModel); returns how many were patched.

    Unsupported shapes (expert biases, several adapters on one wrapper, dropout) keep PEFT's forward.
    """
    patched = 0
    for wrapper in _outermost_wrappers(model):
        by_param, core = _chain(wrapper)
        if any(len(w.lora_A) != 1 for w in by_param.values()):
            continue
        if hasattr(core, "gate_up_proj") and core.gate_up_proj.dim() == 3 and set(by_param) <= {"gate_up_proj", "down_proj"} \
                and getattr(core, "gate_up_proj_bias", None) is None and getattr(core, "down_proj_bias", None) is None:
            wrapper.forward = types.MethodType(_fast_experts_forward, wrapper)
            patched += 1
        elif isinstance(core, nn.Linear) and set(by_param) == {"weight"}:
            wrapper.forward = types.MethodType(_fast_linear_forward, wrapper)
            patched += 1
    return patched


def disable_fast_lora(model: nn.Module) -> None:
    """Back to PEFT's own forwards (e.g. before merging)."""
    for wrapper in _outermost_wrappers(model):
        wrapper.__dict__.pop("forward", None)
