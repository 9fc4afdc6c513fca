"""A stage's state as checkpoint tensors and back: the adapter learned so far (LoRA factors, term rows, ESFT's
selected experts' slices) and the optimizer's per-tensor state, keyed by the trained tensors' names
(:class:`dsft.recipes.stages.Entry`). Plain tensors only: a checkpoint is safetensors, never pickle.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from dsft.adapters.esft import EsftState, apply_slices, put_slices, select_slices, trained_slices
from dsft.base.sharding import full_tensor, shard_like
from dsft.errors import UsageError
from dsft.kernels.optim import steps_as_int

if TYPE_CHECKING:
    from dsft.recipes.stages import Entry


def unwrap(model):
    """The transformers model inside a PeftModel (the model itself when not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def adapter_state(model, spec, esft: EsftState | None) -> dict[str, torch.Tensor]:
    """Everything the adapter has learned so far: every LoRA factor and term row, and the selected
    experts' slices of an ESFT run with full weights."""
    out = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n or n.endswith(".rows")}
    if esft is not None and not esft.lora and esft.selection:
        out.update({f"esft:{k}": v for k, v in trained_slices(model, spec, esft.selection).items()})
    return out


def restore_adapter_state(model, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if name.startswith("esft:"):
                continue
            if name not in params or params[name].shape != value.shape:
                raise UsageError(f"checkpoint tensor {name} does not fit this model; it belongs to another recipe or base")
            params[name].copy_(value)
    slices = {k.removeprefix("esft:"): v for k, v in tensors.items() if k.startswith("esft:")}
    if slices:
        apply_slices(unwrap(model), slices)


def optimizer_tensors(optimizer: torch.optim.Optimizer, entries: list[Entry], n_experts: int) -> dict[str, torch.Tensor]:
    """AdamW's per-parameter state as ``{"<param name>/<key>": tensor}`` (ESFT weights: selected slices). A tensor
    several states share (bitsandbytes' quantisation maps, 256 values) is copied for each: safetensors stores no
    shared memory."""
    out = {}
    storages: set[int] = set()
    for e in entries:
        for key, value in optimizer.state.get(e.param, {}).items():
            if key == "step" and isinstance(value, int):  # bitsandbytes counts steps in a Python int
                value = torch.tensor(value, dtype=torch.int64)
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {key} of {e.name} is not a tensor")
            value = full_tensor(value)  # FSDP2: gathered from every rank's shard (all ranks run this)
            if e.sliced and value.shape == e.param.shape:
                value = select_slices(value, n_experts, e.index, e.dim)
            if value.untyped_storage().data_ptr() in storages:
                value = value.clone()
            storages.add(value.untyped_storage().data_ptr())
            out[f"{e.name}/{key}"] = value
    return out


def restore_optimizer(optimizer: torch.optim.Optimizer, entries: list[Entry], tensors: dict[str, torch.Tensor], n_experts: int) -> None:
    by_name = {e.name: e for e in entries}
    states: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, sub = key.rsplit("/", 1)
        if name not in by_name:
            raise UsageError(f"checkpoint optimizer state for {name}, which this stage does not train; it belongs to another recipe")
        states.setdefault(name, {})[sub] = value
    for name, state in states.items():
        e = by_name[name]
        restored = {}
        for sub, value in state.items():
            if e.sliced and value.dim() > 0 and value.shape != e.param.shape:
                full = torch.zeros(e.param.shape, dtype=e.param.dtype)
                put_slices(full, n_experts, e.index, e.dim, value)
                value = full
            if sub != "step":
                value = shard_like(value, e.param)
            elif steps_as_int(optimizer):
                value = int(value.item())
            elif optimizer.defaults.get("fused"):  # the fused kernel reads its step counts on the device
                value = value.to(e.param.device, torch.float32)
            restored[sub] = value
        optimizer.state[e.param] = restored
