"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for a loaded base with its adapter attached.

Which modules become FSDP units, and why:

* every decoder layer (the class named in the architecture table, or the classes an accelerate config
  names): its frozen weights and its LoRA factors are all-gathered together right before the layer runs
  and freed after it, so a GPU holds one layer's full weights at a time. FSDP2 shards each parameter on
  its own (a DTensor per parameter, same names as before), so frozen base weights and trainable LoRA
  factors can share a unit, and ``requires_grad`` may change between stages (it is read again at every
  all-gather);
* the input embedding (with the term rows) and the decoder stack (final norm): the decoder is the root
  that :func:`dsft.eval.losses.lm_loss` calls;
* the output head (with the term rows) as a unit of its own: the chunked loss calls it outside the
  decoder's forward, several times per step, so it cannot hang under the decoder.

Gradients of a unit are reduce-scattered (averaged over ranks) in backward; the optimizer then updates
each rank's shard only.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from dsft.base.arch import ArchSpec
from dsft.errors import UsageError


def _unwrap(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def shard_model(model, spec: ArchSpec, *, wrap: Sequence[str] = (), reshard_after_forward: bool = True,
                offload: bool = False) -> list[str]:
    """Apply ``fully_shard`` to ``model`` (a transformers model or a PeftModel) in place.

    Args:
        wrap: decoder-layer class names to shard as units (default: the architecture table's).
        reshard_after_forward: free a layer's gathered weights after its forward (re-gathered in backward):
            less memory, one more all-gather per layer.
        offload: keep the shards in CPU memory (FSDP2's CPUOffloadPolicy).

    Returns:
        The names of the modules that became units.

    Raises:
        UsageError: no decoder layer matches ``wrap``.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    kwargs = {"reshard_after_forward": reshard_after_forward, "offload_policy": CPUOffloadPolicy() if offload else OffloadPolicy()}
    base = _unwrap(model)
    names = tuple(wrap) or (spec.decoder_layer,)
    layers = [(n, m) for n, m in base.named_modules() if type(m).__name__ in names]
    if not layers:
        raise UsageError(f"FSDP: no module of {type(base).__name__} is a {' or '.join(names)}; set fsdp_transformer_layer_cls_to_wrap "
                         f"in the accelerate config to the decoder layer class ({spec.decoder_layer})")
    embed, head, decoder = base.get_input_embeddings(), base.get_output_embeddings(), base.get_decoder()
    if getattr(base.config, "tie_word_embeddings", False):
        # One weight in two units (the embedding under the decoder, the head beside it) is what FSDP2 refuses.
        raise UsageError(f"FSDP: {type(base).__name__} ties its input and output embeddings, which dsft cannot shard "
                         "as separate units; use --backend ddp")
    for _, layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(embed, **kwargs)
    fully_shard(head, **kwargs)
    fully_shard(decoder, **kwargs)
    by_module = {id(m): n for n, m in base.named_modules()}
    return [n for n, _ in layers] + [by_module[id(embed)], by_module[id(head)], by_module[id(decoder)]]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a collective: every rank must call it); ``t`` itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor every rank holds) laid out as ``like``: its shard when ``like`` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return value.to(like.device)
    # Every rank loaded the same value, so each cuts its own shard: no communication (src_data_rank=None).
    return distribute_tensor(value.to(like.device_mesh.device_type), like.device_mesh, like.placements, src_data_rank=None)


def local_offset(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(local part, global row offset of its first row)`` of a DTensor sharded on dim 0 (``(t, 0)`` otherwise)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(t, DTensor):
        return t, 0
    if tuple(t.placements) != (Shard(0),):
        raise NotImplementedError(f"only dim-0 sharding is supported, got {t.placements}")
    rank, world = t.device_mesh.get_local_rank(), t.device_mesh.size()
    chunk = -(-t.shape[0] // world)  # torch.chunk's split, which FSDP2 and Shard(0) both use
    return t.to_local(), min(rank * chunk, t.shape[0])


def adapter_tensors(name: str) -> bool:
    """What an adapter is made of: LoRA factors and term rows (the default of :func:`gathered`'s ``select``)."""
    return "lora_" in name or name.endswith(".rows")


@contextmanager
def gathered(model: nn.Module, select: Callable[[str], bool] = adapter_tensors) -> Iterator[None]:
    """While active, the sharded parameters of ``model`` whose names ``select`` picks are whole plain tensors
    on every rank, under the same names: the single-process code that saves adapters and checkpoints runs
    unchanged. Read-only: nothing written to them reaches the shards. Every rank must enter it (each
    parameter is gathered by a collective); without FSDP it does nothing."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:  # a root unit keeps its gathered weights after forward; put every unit back to shards first
        m.reshard()
    swapped = []
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, p in list(module._parameters.items()):
                if isinstance(p, DTensor) and select(f"{module_name}.{name}" if module_name else name):
                    module._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=p.requires_grad)
                    swapped.append((module, name, p))
    try:
        yield
    finally:
        for module, name, p in reversed(swapped):
            module._parameters[name] = p
