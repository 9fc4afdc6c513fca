"""The runtime's routed experts held in FP8 (``load_base(fp8_experts=True)``, ``dsft serve --fp8-experts``).

Each experts module's ``gate_up_proj`` and ``down_proj`` are replaced by their e4m3 values
(:func:`dsft.kernels.fp8.quantize_rows`, the bf16 weights freed), and the row scales ride on the module as plain
attributes (``gate_up_proj_fp8_scale``: not in its ``state_dict``, so nothing saves them by accident). The
runtime's experts forward (:func:`dsft.runtime.mixed_experts.experts_forward_mixed`) takes both; nothing else
reads these weights while the runtime holds the model, and :meth:`dsft.runtime.RuntimeBase.close` widens them
back to the model's dtype (as FP8 rounded them).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from dsft.kernels.fp8 import dequantize, quantize_rows

PROJECTIONS = ("gate_up_proj", "down_proj")
SCALE = "_fp8_scale"


def quantize_experts(modules: Iterable[nn.Module]) -> None:
    """Put each module's expert weights in FP8 (modules already in FP8 are left as they are)."""
    for module in modules:
        for name in PROJECTIONS:
            if getattr(module, name + SCALE, None) is not None:
                continue
            q = quantize_rows(getattr(module, name))
            setattr(module, name, nn.Parameter(q.q, requires_grad=False))
            setattr(module, name + SCALE, q.scale)


def scales_of(module: nn.Module) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(gate_up's, down's) row scales, None for a projection in the model's dtype."""
    return getattr(module, PROJECTIONS[0] + SCALE, None), getattr(module, PROJECTIONS[1] + SCALE, None)


def dequantize_experts(modules: Iterable[nn.Module], dtype: torch.dtype) -> None:
    """The modules' expert weights back in ``dtype``."""
    for module in modules:
        for name in PROJECTIONS:
            scale = getattr(module, name + SCALE, None)
            if scale is not None:
                setattr(module, name, nn.Parameter(dequantize(getattr(module, name), scale, dtype), requires_grad=False))
                delattr(module, name + SCALE)
