"""QLoRA: the frozen base in 4-bit NF4 while LoRA trains in bf16.

:func:`quantize_base` replaces, inside every decoder layer, each frozen ``nn.Linear`` (attention,
dense MLP, shared experts; also under PEFT's LoRA wrappers) with :class:`dsft.kernels.nf4.Nf4Linear`
and each fused routed-expert weight with an :class:`dsft.kernels.nf4.Nf4Tensor` child named
``<param>_nf4``. The router, norms, embeddings and the output head stay as they are (small, and
precision-sensitive). LoRA is attached first, on the bf16 model, exactly as without quantisation;
the fast path then reads expert weights through :func:`expert_weights`, which dequantises them
where they are used.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsft.adapters.esft import EXPERT_PARAMS
from dsft.kernels.nf4 import Nf4Linear, Nf4Tensor

SUFFIX = "_nf4"


@dataclass(frozen=True)
class QuantReport:
    linears: int
    expert_tensors: int
    bytes_before: int
    bytes_after: int


def expert_weights(experts: nn.Module, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate_up_proj, down_proj) of a fused experts module: its parameters, or dequantised from NF4."""
    out = []
    for name in EXPERT_PARAMS:
        q = getattr(experts, name + SUFFIX, None)
        out.append(getattr(experts, name) if q is None else q().to(dtype or q.dtype))
    return out[0], out[1]


def _quantizable(linear: nn.Module) -> bool:
    """A frozen plain linear of useful size (LoRA's own factors are linears too, but they train)."""
    return type(linear) is nn.Linear and not linear.weight.requires_grad and linear.weight.numel() % 64 == 0 \
        and min(linear.in_features, linear.out_features) >= 64


@torch.no_grad()
def quantize_base(model: nn.Module, spec, device: torch.device | str | None = None) -> QuantReport:
    """Put the frozen weights of ``model``'s decoder layers into NF4, in place (see the module docstring).

    Args:
        model: a transformers MoE model or a PeftModel around one (LoRA already attached).
        spec: its architecture table entry (names the router, which stays unquantised).
        device: where the quantised weights go (default: where each weight is). Quantising from a
            CPU-loaded model onto the GPU keeps GPU memory at the 4-bit size throughout.

    Returns:
        How many linears and fused expert tensors were quantised, and their bytes before and after.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    linears = experts = before = after = 0
    for layer in base.get_decoder().layers:
        router = dict(layer.named_modules()).get(spec.router_attr)
        for parent in list(layer.modules()):
            if parent is router:
                continue
            for name, child in list(parent.named_children()):
                if child is router or not _quantizable(child):
                    continue
                q = Nf4Linear(child, device=device)
                before += child.weight.numel() * child.weight.element_size()
                after += q.nf4.packed.numel() + q.nf4.absmax.numel() * 4
                setattr(parent, name, q)
                linears += 1
            for pname in EXPERT_PARAMS:
                w = parent._parameters.get(pname)
                if w is None or w.dim() != 3 or w.requires_grad:
                    continue
                q = Nf4Tensor(w, device=device)
                before += w.numel() * w.element_size()
                after += q.packed.numel() + q.absmax.numel() * 4
                del parent._parameters[pname]
                parent.add_module(pname + SUFFIX, q)
                experts += 1
    if device is not None:
        model.to(device)  # what stays unquantised (embeddings, norms, routers, head, LoRA)
    return QuantReport(linears, experts, before, after)
