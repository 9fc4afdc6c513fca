"""Train ESFT's selected experts as parameters of their own: gradients and AdamW state for those experts only.

transformers fuses a layer's routed experts into ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I].
Training a few experts through the fused tensors costs a full-size gradient and two full-size AdamW
moments per tensor (on DeepSeek-V2-Lite ~3 x 27 GiB: more than one GPU has). Instead, while a stage
trains (:func:`trainable_slices`):

1. each MoE layer's expert *slots* are permuted in place so that the selected experts come first,
   in ascending order (slot s < S holds expert ``index[s]``; the rest keep their relative order);
2. the first S slots become a leaf ``nn.Parameter`` sharing the fused tensor's storage (``W[:S]``),
   so the optimizer's in-place update is the model's weight and nothing is copied per step;
3. the experts module's forward maps each routed expert to its slot and runs the grouped path of
   :func:`dsft.kernels.expert_lora.experts_forward` with ``heads``: one grouped GEMM over all experts,
   whose backward gives a weight gradient for slots 0..S-1 only.

On exit every layer is put back in expert order: the model is the plain transformers model again,
carrying the trained values. :func:`dsft.adapters.esft.slot_index` finds an expert in either state.
"""
from __future__ import annotations

import types
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from dsft.adapters.esft import EXPERT_PARAMS, SLOT, moe_layers
from dsft.kernels.expert_lora import experts_forward

HEADS = "dsft_heads"


@dataclass(frozen=True)
class SliceParam:
    """One trained tensor: the selected experts' part of a fused expert weight."""

    name: str
    """The fused parameter's name, ``model.layers.<l>.<experts>.gate_up_proj`` / ``down_proj``."""
    param: nn.Parameter
    """[S, out, in], sharing storage with the fused weight's first S slots."""
    index: torch.Tensor
    """The experts, ascending: ``param[s]`` is expert ``index[s]``."""


def _sliced_forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    return experts_forward(hidden_states, getattr(self, SLOT)[top_k_index], top_k_weights, self.gate_up_proj,
                           self.down_proj, self.act_fn, heads=getattr(self, HEADS))


@torch.no_grad()
def _move_slots_(experts: nn.Module, source: torch.Tensor) -> None:
    """Slot s takes what slot ``source[s]`` holds, for both fused weights (one temporary copy of each)."""
    for pname in EXPERT_PARAMS:
        w = getattr(experts, pname)
        w.copy_(w[source.to(w.device)])


def _restore(experts: nn.Module) -> None:
    slot = getattr(experts, SLOT)
    _move_slots_(experts, slot)  # expert e is at slot[e]
    for attr in (SLOT, HEADS):
        delattr(experts, attr)
    experts.__dict__.pop("forward", None)


@contextmanager
def trainable_slices(model, spec, selection: Mapping[int, Sequence[int]]) -> Iterator[list[SliceParam]]:
    """While active, the selected experts of every layer are leaf parameters (see the module docstring).

    Args:
        model: a transformers MoE model (not PEFT-wrapped on its experts).
        spec: its architecture table entry.
        selection: ``{layer: experts}``; layers absent or empty train nothing.

    Yields:
        The trained tensors, two per selected layer (gate_up_proj, down_proj), requiring grad.
    """
    patched: list[nn.Module] = []
    out: list[SliceParam] = []
    try:
        for i, (path, experts, _) in moe_layers(model, spec).items():
            chosen = sorted(set(selection.get(i, ())))
            if not chosen:
                continue
            n = experts.gate_up_proj.shape[0]
            rest = sorted(set(range(n)) - set(chosen))
            order = torch.tensor(chosen + rest, dtype=torch.long)   # slot s holds expert order[s]
            slot = torch.empty_like(order)
            slot[order] = torch.arange(n)
            _move_slots_(experts, order)
            setattr(experts, SLOT, slot.to(experts.gate_up_proj.device))
            patched.append(experts)
            heads = tuple(nn.Parameter(getattr(experts, p).data[: len(chosen)], requires_grad=True) for p in EXPERT_PARAMS)
            setattr(experts, HEADS, heads)
            experts.forward = types.MethodType(_sliced_forward, experts)
            index = torch.tensor(chosen, dtype=torch.long)
            out += [SliceParam(f"{path}.{p}", h, index) for p, h in zip(EXPERT_PARAMS, heads)]
        yield out
    finally:
        for experts in reversed(patched):
            _restore(experts)
