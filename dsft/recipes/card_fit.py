"""What fits on this GPU, by ``dsft plan``'s memory model: the micro-batch a stage can take
(:func:`fits_on_card`, for :mod:`dsft.recipes.sizing`) and the layers that can skip activation recompute
(:func:`spare_recompute`, ``--keep-layers auto``), and taking those back when a step runs out of memory
(:func:`keep_fewer_layers`)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from dsft.base.loading import BaseRef
from dsft.errors import UsageError
from dsft.kernels.attention_recompute import recompute_attention_inputs, restore_attention_inputs
from dsft.recipes.distributed import Dist
from dsft.recipes.schema import Recipe
from dsft.recipes.sizing import PLAN_MARGIN


def _method(rec: Recipe, nf4: bool) -> str:
    return "esft" if rec.uses_esft else "qlora" if nf4 else "lora"


def fits_on_card(base: BaseRef, rec: Recipe, nf4: bool, new_terms: int, device: str,
                 fsdp_gpus: int = 1) -> Callable[..., bool]:
    """``fits(m, seq, checkpointing=True)``: whether a micro-batch of ``m`` rows of ``seq`` tokens fits the card of
    ``device`` with :data:`dsft.recipes.sizing.PLAN_MARGIN` of it to spare, every layer recomputing its activations
    in backward (``checkpointing=False``: every layer keeping them); ``fsdp_gpus``: the model is sharded over that
    many GPUs (FSDP2), each holding its share of the weights and state. The model is counted once (seconds)."""
    from dsft.eval.plan import PlanRequest, count_model, estimate_memory

    counts = count_model(base, lora_r=rec.adapter.r)
    card = torch.cuda.get_device_properties(torch.device(device)).total_memory

    def fits(m: int, seq: int, checkpointing: bool = True) -> bool:
        req = PlanRequest(base=base.name, method=_method(rec, nf4), batch=m, seq=seq, lora_r=rec.adapter.r, new_terms=new_terms,
                          num_gpus=fsdp_gpus, checkpointing=checkpointing, optimizer=rec.optimizer)
        return estimate_memory(counts, req)[0].total <= (1 - PLAN_MARGIN) * card
    return fits


def spare_recompute(model, keep: int | str, base: BaseRef, rec: Recipe, nf4: bool, new_terms: int, device: str, dist: Dist,
                    compiled: bool = True, attention: bool | None = None) -> tuple[int, bool]:
    """Leave the last ``keep`` decoder layers (``auto``: as many as fit, by the planner; none for a 4-bit base or
    several processes) out of activation checkpointing; returns how many, and whether their attention recomputes its
    inputs in backward (:mod:`dsft.kernels.attention_recompute`). ``attention``: None lets ``auto`` choose
    (:func:`dsft.eval.plan.keep_plan`: where not every layer fits plainly) and a given count keep plainly; True or
    False decides. ``rec`` is sized (:mod:`dsft.recipes.sizing`): a forward holds a micro-batch, not the whole
    step. ``compiled``: the layers will be compiled (with :data:`dsft.kernels.compile.KEPT_MEMORY_BUDGET`), which
    keeps less per layer than eager."""
    layers = model.get_decoder().layers
    lean = bool(attention)
    if keep == "auto":
        keep = 0
        # Sharded or replicated runs: per-GPU memory is not what the single-card plan assumes. A 4-bit base: a
        # layer out of checkpointing would also hold its dequantised bf16 weights for backward (dsft.kernels.nf4).
        if not dist.enabled and not nf4:
            from dsft.eval.plan import PlanRequest, count_model, keep_plan, layers_to_keep

            big = max(rec.stages, key=lambda s: s.micro_batch_size * s.seq_len)
            req = PlanRequest(base=base.name, method=_method(rec, nf4), batch=big.micro_batch_size, seq=big.seq_len,
                              lora_r=rec.adapter.r, new_terms=new_terms, optimizer=rec.optimizer)
            card = torch.cuda.get_device_properties(torch.device(device)).total_memory
            counts = count_model(base, lora_r=rec.adapter.r)
            if attention is None:
                keep, lean = keep_plan(counts, req, card, compiled=compiled)
            else:
                keep = layers_to_keep(counts, req, card, compiled=compiled, attention_recomputed=lean)
    if keep > len(layers):
        raise UsageError(f"--keep-layers must be in 0..{len(layers)} (this base's decoder layers), got {keep}")
    for layer in list(layers)[len(layers) - keep:] if keep else []:
        layer.gradient_checkpointing = False  # keeps its activations: no recompute in backward
        if lean:
            recompute_attention_inputs(layer)
    return keep, lean and keep > 0


def keep_fewer_layers(model, record: dict[str, int]) -> dict[str, int] | None:
    """After a step ran out of memory with ``record`` (:func:`spare_recompute`'s ``{"kept_layers", "layers",
    "attention_recomputed"}``) keeping some layers' activations: half of them (rounded down) keep them from now on,
    the others recompute again (their attention plain again). Returns the new record, which also says how many were
    kept when memory ran out (None: none were, nothing to give back). Halving, not all at once: the plan errs by a
    few layers, and each kept layer is ~1.3% of a step."""
    kept = record.get("kept_layers", 0)
    if not kept:
        return None
    layers = model.get_decoder().layers
    now = kept // 2
    for layer in list(layers)[len(layers) - kept:len(layers) - now]:
        layer.gradient_checkpointing = True
        restore_attention_inputs(layer)
    return {"kept_layers": now, "layers": record["layers"], "attention_recomputed": bool(now and record.get("attention_recomputed")),
            "out_of_memory_with": kept}
