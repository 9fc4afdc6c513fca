"""LoRA linears whose down-projection shares the base weight's GEMM: ``[y | h] = x [W; A]^T``.

A decode step is bound by kernel launches, and every LoRA linear costs three GEMMs (``x W^T``, ``x A^T``,
``h B^T``) where the base alone costs one. With every attached adapter's A stacked under W in one buffer,
``x W^T`` and ``x A^T`` come out of one GEMM, and ``h B^T`` is accumulated into ``y`` in place: two GEMMs.

The module's own ``weight`` becomes a view of the buffer's first rows (no second copy of W), so everything
else that reads it (the plain forward outside the runtime, ``MultiLora.check``) sees the same values. When
the adapters change, the buffer is rebuilt from that view; :meth:`FusedLinears.release` gives the module a
compact weight of its own back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Fused:
    """One module's ``[W; A]`` (its ``weight`` is ``stacked[:out]``) and bias padded with zeros for A's rows."""

    stacked: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    version: int


class FusedLinears:
    """The fused buffers of the runtime's LoRA linears, each built for one version of the attached adapters."""

    def __init__(self) -> None:
        self._by_path: dict[str, Fused] = {}

    def get(self, path: str, module: nn.Module, A: torch.Tensor, version: int) -> Fused | None:
        """``module``'s buffer with ``A`` (every attached adapter's factors, stacked) under its weight, built
        when ``version`` is new; None for a weight that cannot share a buffer (quantised, another dtype)."""
        hit = self._by_path.get(path)
        if hit is not None and hit.version == version:
            return hit
        w = module.weight
        if (type(w) is not nn.Parameter or w.dtype != A.dtype or w.device != A.device or not w.is_contiguous()
                or A.shape[1] != w.shape[1]):
            return None
        out = w.shape[0]
        stacked = torch.empty((out + A.shape[0], w.shape[1]), dtype=w.dtype, device=w.device)
        with torch.no_grad():
            stacked[:out].copy_(w)
            stacked[out:].copy_(A)
        w.data = stacked[:out]  # the old buffer (or W's own storage) is freed with its last view
        bias = module.bias
        padded = None if bias is None else torch.cat([bias.detach(), bias.new_zeros(A.shape[0])])
        hit = self._by_path[path] = Fused(stacked, padded, out, version)
        return hit

    def release(self, path: str, module: nn.Module) -> None:
        """Forget ``path``'s buffer; its module gets a weight of its own (without the A rows) back."""
        if self._by_path.pop(path, None) is not None:
            module.weight.data = module.weight.data.clone()


def fused_lora_linear(x: torch.Tensor, fused: Fused, B: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b + ((x A^T) * mask) B^T`` with W and A in one GEMM; the result is a view of that GEMM's output
    (its rows are strided by the A columns past it, which only the last dimension's views see)."""
    full = torch.nn.functional.linear(x, fused.stacked, fused.bias)
    y, h = full[..., : fused.out_features], full[..., fused.out_features :]
    if mask is not None:
        h = h * mask.view(h.shape)
    y.view(-1, y.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), B.t())
    return y
