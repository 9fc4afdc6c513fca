"""LoRA weights whose down-projection shares the base weight's GEMM: ``[y | h] = x [W; A]^T``.

A decode step is bound by kernel launches, and every LoRA linear costs three GEMMs (``x W^T``, ``x A^T``,
``h B^T``) where the base alone costs one. With every attached adapter's A stacked under W in one buffer,
``x W^T`` and ``x A^T`` come out of one GEMM, and ``h B^T`` is accumulated into ``y`` in place: two GEMMs (on a
GPU at decode sizes the second applies the rows' rank mask as it reads h: :mod:`dsft.kernels.lora_up`).
Routed experts take the same buffer per expert (``[E, out + R, in]``: each expert's A rows under its W rows),
so the grouped GEMM of the base experts gives each (token, expert) pair's ``x A_e^T`` too.

The module's own weight becomes a view of the buffer's first rows (no second copy of W), so everything
else that reads it (the plain forward outside the runtime, ``MultiLora.check``) sees the same values. When
the adapters change, the buffer is rebuilt from that view; :meth:`FusedWeights.release` gives the module a
compact weight of its own back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dsft.kernels import lora_up, moe_gemm


@dataclass(frozen=True)
class Fused:
    """One weight's ``[W; A]`` along the output rows (the module's weight is ``stacked[..., :out, :]``), and
    for a linear its bias padded with zeros for A's rows."""

    stacked: torch.Tensor
    bias: torch.Tensor | None
    out_features: int
    version: int


class FusedWeights:
    """The fused buffers of the runtime's LoRA linears and routed experts, each built for one version of the
    attached adapters. A linear's weight is ``[out, in]`` with A ``[R, in]``; experts' ``[E, out, in]`` with A
    ``[E, R, in]``."""

    def __init__(self) -> None:
        self._by_key: dict[tuple[str, str], Fused] = {}

    def get(self, path: str, module: nn.Module, A: torch.Tensor, version: int, name: str = "weight") -> Fused | None:
        """``module.<name>`` with ``A`` (every attached adapter's factors, stacked) under its rows, built when
        ``version`` is new; None for a weight that cannot share a buffer (quantised, another dtype or shape)."""
        key = (path, name)
        hit = self._by_key.get(key)
        if hit is not None and hit.version == version:
            return hit
        w = getattr(module, name)
        ours = hit is not None and w.data_ptr() == hit.stacked.data_ptr()  # a view of the buffer we built before
        if (type(w) is not nn.Parameter or w.dtype != A.dtype or w.device != A.device or w.dim() != A.dim()
                or not (ours or w.is_contiguous()) or A.shape[:-2] != w.shape[:-2] or A.shape[-1] != w.shape[-1]):
            return None
        out = w.shape[-2]
        stacked = torch.empty((*w.shape[:-2], out + A.shape[-2], w.shape[-1]), dtype=w.dtype, device=w.device)
        with torch.no_grad():
            stacked[..., :out, :].copy_(w)
            stacked[..., out:, :].copy_(A)
        w.data = stacked[..., :out, :]  # the old buffer (or W's own storage) is freed with its last view
        bias = getattr(module, "bias", None) if name == "weight" else None
        padded = None if bias is None else torch.cat([bias.detach(), bias.new_zeros(A.shape[-2])])
        hit = self._by_key[key] = Fused(stacked, padded, out, version)
        return hit

    def release(self, path: str, module: nn.Module, name: str = "weight") -> None:
        """Forget the buffer of ``path``'s ``name``; its module gets a compact weight of its own back."""
        if self._by_key.pop((path, name), None) is not None:
            w = getattr(module, name)
            w.data = w.data.clone(memory_format=torch.contiguous_format)


def fused_lora_linear(x: torch.Tensor, fused: Fused, B: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b + ((x A^T) * mask) B^T`` with W and A in one GEMM; the result is a view of that GEMM's output
    (its rows are strided by the A columns past it, which only the last dimension's views see)."""
    full = torch.nn.functional.linear(x, fused.stacked, fused.bias)
    y, h = full[..., : fused.out_features], full[..., fused.out_features :]
    rows, low = y.view(-1, y.shape[-1]), h.reshape(-1, h.shape[-1])
    if lora_up.usable(rows, low):  # decode sizes on a GPU: the mask product inside the up-projection's kernel
        done = moe_gemm.or_none(lora_up.lora_up_, rows, low, B, None if mask is None else mask.view(low.shape))
        if done is not None:
            return y
    if mask is not None:
        low = low * mask.view(low.shape)
    rows.addmm_(low, B.t())
    return y
