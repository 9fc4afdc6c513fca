"""Measure what :mod:`dsft.eval.plan` predicts: two real training steps of one setting, peak memory.

On CUDA the peak is ``torch.cuda.max_memory_allocated``; on CPU it is the growth of the process's peak
resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) over the resident set after the model
is loaded, so there it is compared with the plan's memory *beyond* weights and trainable parameters.
The step is dsft's own: term rows, LoRA through :func:`dsft.adapters.lora.attach_lora` (fast path),
ESFT's selected experts as parameters of their own, the chunked loss, AdamW. ``dsft plan --measure`` runs it.
"""
from __future__ import annotations

import gc
import math
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from dsft.eval.plan import GIB, PlanRequest

_STATUS = Path("/proc/self/status")


@dataclass(frozen=True)
class Measured:
    peak_bytes: float
    """CUDA: the allocated peak. CPU: peak resident-set growth during the steps."""
    new_terms: int
    trainable_params: int


def _rss(field: str) -> int:
    for line in _STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in {_STATUS}")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _large_blocks_from_mmap() -> None:
    """Have glibc serve blocks >= 64 KiB from mmap, so a freed tensor leaves the resident set at once
    (its default threshold grows at run time and would let freed memory linger, hiding later peaks)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: the measurement is only less exact
        pass


@dataclass
class Prepared:
    """A base made ready to train the way ``req.method`` trains it (one per method; any batch or length)."""

    model: object
    tokenizer: object
    trainable: list
    esft: tuple | None
    """(spec, selection) when the selected experts train as slices (:mod:`dsft.adapters.esft_slices`)."""
    new_terms: int


def prepare(req: PlanRequest, loaded=None, seed: int = 0) -> Prepared:
    """Load ``req.base`` (or take ``loaded``, modified in place) and set up what ``req.method`` trains."""
    from dsft.adapters.esft import moe_layers
    from dsft.adapters.lora import LoraSettings, attach_lora
    from dsft.adapters.terms import extend_model, plan_terms
    from dsft.base import load_base
    from dsft.base.arch import num_experts
    from dsft.domains import resolve_domain

    loaded = loaded or load_base(req.base, device=req.device)
    model, tokenizer, spec = loaded.model, loaded.tokenizer, loaded.spec
    torch.manual_seed(seed)
    plan = plan_terms(tokenizer, [t for t, _ in resolve_domain("finance").terms][: req.new_terms])
    extend_model(model, tokenizer, plan)
    for p in model.parameters():
        p.requires_grad_(False)
    esft = None
    if req.method in ("lora", "qlora"):
        model = attach_lora(model, spec, LoraSettings(r=req.lora_r, alpha=2 * req.lora_r))
        trainable = [p for n, p in model.named_parameters() if "lora_" in n]
        if req.method == "qlora":
            from dsft.adapters.qlora import quantize_base

            quantize_base(model, spec)
    elif req.method == "esft":
        n_exp = num_experts(spec, model.config)
        k = max(1, math.ceil(n_exp * req.esft_share))
        esft, trainable = (spec, {i: tuple(range(k)) for i in moe_layers(model, spec)}), []
    else:
        trainable = list(model.parameters())
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if plan.terms:
        trainable += [base.get_input_embeddings().rows, base.get_output_embeddings().rows]
    for p in trainable:
        p.requires_grad_(True)
    if req.device == "cuda" and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    model.train()
    return Prepared(model, tokenizer, trainable, esft, len(plan.terms))


def measure(req: PlanRequest, prepared: Prepared | None = None, steps: int = 2) -> Measured:
    """Run ``steps`` training steps of ``req`` (on ``prepared``, or a fresh base) and return the peak."""
    from dsft.adapters.esft_slices import trainable_slices

    cuda = req.device == "cuda"
    prep = prepared or prepare(req)
    model = prep.model
    if cuda and req.checkpointing:  # as dsft train does on CUDA
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:  # (a model prepared for an earlier setting may have it on; off again is a no-op otherwise)
        model.gradient_checkpointing_disable()
    ids = torch.randint(0, len(prep.tokenizer), (req.batch, req.seq), device=next(model.parameters()).device)
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}
    with ExitStack() as stack:  # ESFT's slices are set up before the peak is reset: that copy is not a training cost
        slices = stack.enter_context(trainable_slices(model, *prep.esft)) if prep.esft else []
        trainable = prep.trainable + [s.param for s in slices]
        peak = _steps(model, batch, trainable, cuda, steps, req.optimizer)
    del batch, ids
    gc.collect()
    return Measured(peak, prep.new_terms, sum(p.numel() for p in trainable))


def _steps(model, batch, trainable, cuda: bool, steps: int, optimizer_kind: str = "adamw") -> float:
    from dsft.eval.losses import lm_loss
    from dsft.kernels.optim import build_adamw

    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        if not Path("/proc/self/clear_refs").exists():
            from dsft.errors import UsageError

            raise UsageError("--measure on CPU reads the peak resident set from /proc (Linux only); measure on a CUDA device instead")
        _large_blocks_from_mmap()
        start = _rss("VmRSS")
        _reset_peak_rss()
    optimizer = build_adamw([{"params": trainable, "weight_decay": 0.0}], 1e-5, (0.9, 0.99), optimizer_kind)  # as dsft train
    for _ in range(steps):
        lm_loss(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated())
    return float(_rss("VmHWM") - start)


def compare(req: PlanRequest, counts=None, prepared: Prepared | None = None) -> dict:
    """Plan and measure ``req``: predicted and measured GiB and the relative error (see the module docstring)."""
    from dsft.eval.plan import count_model, estimate_memory

    m = measure(req, prepared)
    req = PlanRequest(**{**req.__dict__, "new_terms": m.new_terms})
    c = counts or count_model(req.base, lora_r=req.lora_r, dtype=torch.bfloat16 if req.device == "cuda" else torch.float32)
    mem = estimate_memory(c, req)[0]
    predicted = mem.peak_allocated if req.device == "cuda" else mem.peak_allocated - mem.weights - mem.trainable
    return {"base": req.base, "method": req.method, "batch": req.batch, "seq": req.seq, "checkpointing": req.checkpointing,
            "device": req.device, "predicted_gib": round(predicted / GIB, 3), "measured_gib": round(m.peak_bytes / GIB, 3),
            "error": round(predicted / m.peak_bytes - 1, 4), "trainable_params": m.trainable_params}

