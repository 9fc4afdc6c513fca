"""One stage of a recipe: choose what trains, build the optimizer, train (its state to and from checkpoint
tensors: :mod:`dsft.recipes.stage_state`).

What trains, by stage kind:

* cpt / sft / distill: the LoRA factors of the stage's groups on the top ``train.top_layers`` of the
  layers (or, with ``train.unfreeze``, a growing share of them: a layer's factors join at the step
  the schedule reaches it), plus the term rows with ``train.terms``;
* esft: the routed experts the domain uses (scored on the stage's own data before its first step),
  as full weights or through LoRA on them (``esft.lora``), plus the term rows with ``train.terms``.

Every trained tensor is an :class:`Entry`; checkpoints store entries by name (ESFT's fused expert
weights and their optimizer moments only as the selected experts' slices).
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dsft.adapters.esft import (
    EsftState,
    expert_grad_mask,
    expert_parameters,
    moe_layers,
    score_experts,
    select_layers,
    union,
)
from dsft.adapters.esft_slices import trainable_slices
from dsft.adapters.lora import LoraSettings, layer_indices, lora_targets
from dsft.adapters.terms import TermPlan
from dsft.base.arch import num_experts, supports_fused_experts
from dsft.base.router import RouterProbe
from dsft.errors import UsageError
from dsft.eval.heldout import scoring_sample
from dsft.eval.losses import heldout_loss
from dsft.kernels.attention import attention_as, training_attention
from dsft.kernels.optim import build_adamw
from dsft.kernels.varlen import VARLEN
from dsft.recipes.distributed import Dist
from dsft.recipes.graphs import StepGraphs, graphs_off_reason, no_mask_built, recorded_alike
from dsft.recipes.loop import train_steps
from dsft.recipes.schema import Stage
from dsft.recipes.sources import StageData, stage_batches
from dsft.recipes.stage_state import optimizer_tensors, restore_optimizer, unwrap

Event = Callable[[str, dict[str, Any]], None]
_LAYER = re.compile(r"layers\.(\d+)\.")


@dataclass(frozen=True)
class Entry:
    """One tensor the stage trains. ``index``/``dim``: for ESFT, the selected experts and the expert
    dimension of the fused tensor (only those slices train and are checkpointed)."""

    name: str
    param: nn.Parameter
    group: str
    """lora | terms | experts"""
    layer: int | None = None
    index: torch.Tensor | None = None
    dim: int = 0
    slices_only: bool = False
    """``param`` holds only the selected experts (:mod:`dsft.adapters.esft_slices`), not the fused tensor."""

    @property
    def sliced(self) -> bool:
        """Full fused expert weights: checkpoint only the selected slices."""
        return self.group == "experts" and self.index is not None and self.param.dim() == 3 and not self.slices_only

    def trained_numel(self, n_experts: int) -> int:
        if self.index is None or self.slices_only:
            return self.param.numel()
        return self.param.numel() // n_experts * len(self.index)


def term_entries(model, stage: Stage, plan: TermPlan) -> list[Entry]:
    if not (stage.train.terms and plan.terms):
        return []
    base = unwrap(model)
    names = {id(p): n for n, p in model.named_parameters()}
    rows = [base.get_input_embeddings().rows, base.get_output_embeddings().rows]
    return [Entry(names[id(p)], p, "terms") for p in rows]


def lora_entries(model, spec, stage: Stage) -> list[Entry]:
    """The LoRA factors of the stage's groups on every layer it trains at some point."""
    if not stage.train.lora:
        return []
    base = unwrap(model)
    top = stage.train.max_top_layers
    layers = layer_indices(base, None if top >= 1 else top)
    modules, params = lora_targets(base, spec, LoraSettings(targets=stage.train.lora, layers=layers))
    prefixes = tuple(m + "." for m in modules) + tuple(p.rsplit(".", 1)[0] + "." for p in params)
    out = []
    for n, p in model.named_parameters():
        if "lora_" in n and any(pre in n for pre in prefixes):
            m = _LAYER.search(n)
            out.append(Entry(n, p, "lora", int(m.group(1)) if m else None))
    return out


def expert_entries(model, spec, selection: dict[int, tuple[int, ...]], lora: bool, stack: ExitStack | None = None
                   ) -> list[Entry]:
    """What an ESFT stage trains. Full weights with ``stack``: the selected experts as parameters of their
    own for as long as ``stack`` is open (gradients and optimizer state for those experts only);
    otherwise the fused tensors, with gradients masked to the selected experts."""
    if stack is not None and not lora and sliceable(model, spec, selection):
        slices = stack.enter_context(trainable_slices(unwrap(model), spec, selection))
        return [Entry(sp.name, sp.param, "experts", int(_LAYER.search(sp.name).group(1)), sp.index, 0, slices_only=True)
                for sp in slices]
    return [Entry(name, p, "experts", int(_LAYER.search(name).group(1)), idx, dim)
            for name, p, idx, dim in expert_parameters(model, spec, selection, lora=lora)]


def sliceable(model, spec, selection: dict[int, tuple[int, ...]]) -> bool:
    """Every selected layer's experts module is a plain fused one that :func:`trainable_slices` can patch."""
    base = unwrap(model)
    layers = base.get_decoder().layers
    for i, (_, experts, _) in moe_layers(base, spec).items():
        if selection.get(i) and (layers[i].get_submodule(spec.experts_attr) is not experts or not supports_fused_experts(experts)):
            return False
    return True


# --- running a stage --------------------------------------------------------------------------------


@dataclass
class StageContext:
    """What every stage of a run shares."""

    model: Any
    spec: Any
    plan: TermPlan
    eval_sets: dict[str, Any]
    base_tokens: dict[str, int]
    emit: Event
    esft: EsftState | None = None
    teacher_factory: Callable[[Stage], Any] | None = None
    dist: Dist = field(default_factory=Dist)
    trained: dict[str, int] = field(default_factory=dict)
    """Elements trained so far by key (a tensor, or one expert's slice): their sum is the adapter's size."""
    optimizer: str = "adamw"
    """The recipe's ``optimizer`` (:func:`dsft.kernels.optim.build_adamw`)."""
    eval_every: int = 0
    """The recipe's ``eval_every``: held-out losses every this many steps inside a stage (0: none)."""
    on_out_of_memory: Callable[[], bool] | None = None
    """A training step ran out of GPU memory: free what can be freed and return True to retry it (see
    :func:`dsft.recipes.loop.train_steps`)."""

    @property
    def n_experts(self) -> int:
        return num_experts(self.spec, unwrap(self.model).config)


@dataclass
class Resume:
    """Where a stage continues from: steps done, their losses, optimizer state and the ESFT selection."""

    step: int
    losses: list[float]
    optimizer: dict[str, torch.Tensor]
    selection: dict[int, tuple[int, ...]] | None = None


def evaluate(model, sets: dict[str, Any], base_tokens: dict[str, int], dist: Dist | None = None,
             base_key: str | None = None) -> dict[str, float]:
    """Held-out loss per set, normalised by the *base* tokenizer's token count so before/after compare.
    With several ranks, each evaluates its share of the examples and the sums are added up. ``base_key``:
    ``model`` is the unmodified base, measured once per base version and rows (:mod:`dsft.eval.base_cache`)."""
    dist = dist or Dist()
    out = {}
    for name, ex in sets.items():
        r = heldout_loss(model, dist.eval_share(ex.to_dict()), base_key=base_key if not dist.enabled else None)
        summed, _ = dist.all_sum([r["loss"] * r["tokens"], r["tokens"]])
        loss = summed / base_tokens[name]
        out[f"{name}_loss"] = round(loss, 5)
        out[f"{name}_ppl"] = round(float(torch.tensor(loss).exp()), 4)
    return out


def evaluate_mid_stage(ctx: StageContext, stage: str, step: int, steps: int, attention: str | None) -> None:
    """Every ``ctx.eval_every`` steps of a stage (not its last: the stage's own evaluation follows it), the held-out
    losses as a ``step_eval`` event. Runs between two optimizer steps with the weights after ``step``, with the
    model's own ``attention`` (as the stage's final evaluation); the model goes back to training mode and attention
    after it (no dropout or randomness in between, so the run trains exactly as without it)."""
    if not ctx.eval_every or step % ctx.eval_every or step >= steps:
        return
    was_training = ctx.model.training
    with attention_as(ctx.model, attention):
        figures = evaluate(ctx.model, ctx.eval_sets, ctx.base_tokens, ctx.dist)
    ctx.model.train(was_training)
    ctx.emit("step_eval", {"stage": stage, "step": step, **figures})


def _esft_selection(ctx: StageContext, stage: Stage, data: StageData) -> dict[int, tuple[int, ...]]:
    s = stage.esft_settings
    scores = score_experts(ctx.model, ctx.spec, scoring_sample(data.examples, s.sample_tokens))
    # Ranks score the same data, but float reductions may differ in the last bit: rank 0's choice decides.
    selection = ctx.dist.broadcast(select_layers(scores.of(s.method), s.threshold))
    if ctx.esft is None:
        ctx.esft = EsftState(s.method, s.threshold, s.lora)
    ctx.esft.tokens += scores.tokens
    return selection


def run_stage(ctx: StageContext, index: int, stage: Stage, data: StageData, steps: int, resume: Resume | None,
              checkpoint: Callable[..., None]) -> dict[str, Any]:
    """Train one stage from ``resume`` (or its start), evaluate, and return its metrics.

    ``checkpoint(steps_done, losses, optimizer_state, selection)`` is called after every step, with
    ``optimizer_state()`` giving the optimizer's tensors; the caller decides whether to write one.
    """
    with ExitStack() as stack:  # ESFT's trainable slices live as long as the stage
        return _run_stage(ctx, index, stage, data, steps, resume, checkpoint, stack)


def _trainable(ctx: StageContext, stage: Stage, data: StageData, resume: Resume | None, stack: ExitStack
               ) -> tuple[list[Entry], list[Entry], dict[int, tuple[int, ...]] | None]:
    """What the stage trains, as the kinds table says: (LoRA factors or selected experts, term rows, the ESFT
    selection or None). Only these require grad afterwards."""
    model, spec = ctx.model, ctx.spec
    selection = None
    if stage.kind_spec.trains == "experts":
        selection = resume.selection if resume and resume.selection is not None else _esft_selection(ctx, stage, data)
        ctx.esft.selection = union(ctx.esft.selection, selection)
    for p in model.parameters():
        p.requires_grad_(False)
    fsdp = ctx.dist.enabled and ctx.dist.sharding == "fsdp"  # FSDP2 shards the fused tensors: slices cannot alias them
    main = expert_entries(model, spec, selection, stage.esft_settings.lora, None if fsdp else stack) if selection is not None \
        else lora_entries(model, spec, stage)
    terms = term_entries(model, stage, ctx.plan)
    if not main + terms:
        raise UsageError(f"stage {stage.name}: trains nothing on this base (no matching LoRA targets, experts or new terms)")
    for e in main + terms:
        e.param.requires_grad_(True)
    return main, terms, selection


def _optimizer(stage: Stage, main: list[Entry], terms: list[Entry], kind: str) -> torch.optim.Optimizer:
    # Decay would shrink the frozen experts' slices too, and the term rows start as means of real rows.
    decay = stage.weight_decay if stage.kind_spec.trains != "experts" else 0.0
    groups = [{"params": [e.param for e in main], "weight_decay": decay}, {"params": [e.param for e in terms], "weight_decay": 0.0}]
    return build_adamw([g for g in groups if g["params"]], stage.lr, (0.9, 0.99), kind)


def trained_sizes(entries: list[Entry], n_experts: int) -> dict[str, int]:
    """Elements trained per key: a tensor, or one selected expert's slice of a fused tensor."""
    out = {}
    for e in entries:
        keys = [f"{e.name}#{int(i)}" for i in e.index] if e.index is not None else [e.name]
        for k in keys:
            out[k] = e.trained_numel(n_experts) // len(keys)
    return out


def _run_stage(ctx: StageContext, index: int, stage: Stage, data: StageData, steps: int, resume: Resume | None,
               checkpoint: Callable[..., None], stack: ExitStack) -> dict[str, Any]:
    model, spec, s = ctx.model, ctx.spec, stage
    main, terms, selection = _trainable(ctx, s, data, resume, stack)
    entries = main + terms
    n_experts = ctx.n_experts
    optimizer = _optimizer(s, main, terms, ctx.optimizer)
    start, done_losses = 0, []
    if resume is not None:
        restore_optimizer(optimizer, entries, resume.optimizer, n_experts)
        start, done_losses = resume.step, list(resume.losses)
    stage_trained = trained_sizes(entries, n_experts)
    ctx.trained.update(stage_trained)

    lora = [e for e in main if e.group == "lora"]
    base = unwrap(model)

    def unfreeze(step: int) -> None:
        top = s.train.top_layers_at(step, steps)
        active = set(layer_indices(base, None if top >= 1 else top))
        for e in lora:
            e.param.requires_grad_(e.layer in active)

    own_attention = unwrap(model).config._attn_implementation  # before training_attention switches it

    def after_step(step: int, step_losses: list[float]) -> None:
        evaluate_mid_stage(ctx, s.name, step, steps, own_attention)
        checkpoint(step, done_losses + step_losses, lambda: optimizer_tensors(optimizer, entries, n_experts), selection)

    loss = s.kind_spec.loss(s, ctx.teacher_factory)
    teacher = loss.teacher
    ctx.emit("stage_start", {"index": index, "stage": s.name, "kind": s.kind, "steps": steps, "start_step": start,
                             "realised_mixture": data.realised, "phases": data.phases,
                             "trainable": sum(stage_trained.values()), "experts": selection,
                             "teacher": teacher.name if teacher else None})
    probe = RouterProbe(base, spec, global_stats=ctx.dist.enabled)
    device = next(model.parameters()).device
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    expert_params = [(e.name, e.param, e.index, e.dim) for e in main if e.group == "experts" and not e.slices_only]
    sync = ctx.dist.step_sync(data.examples, s.batch_size)
    graphs_off = graphs_off_reason(device, distributed=ctx.dist.enabled)
    graphs: StepGraphs | None = None
    if sync is not None and ctx.dist.sharding == "fsdp":  # FSDP2 shards get no tensor-hook calls; mask after backward
        sync.expert_masks, expert_params = [(p, n_experts, idx, dim) for _, p, idx, dim in expert_params], []
    t0 = time.perf_counter()
    try:
        with expert_grad_mask(expert_params, n_experts) if expert_params else nullcontext(), \
                training_attention(model, device) as attention, \
                training_attention(teacher.model, device) if teacher else nullcontext() as teacher_attention:
            if graphs_off is None:  # variable-length attention builds no mask from the data: every batch records alike
                varlen = attention == VARLEN and teacher_attention in (None, VARLEN)
                graphs = StepGraphs(on_warning=lambda m: ctx.emit("warning", {"message": f"stage {s.name}: {m}"}),
                                    alike=no_mask_built if varlen else recorded_alike)
            losses = done_losses + train_steps(
                model, optimizer, stage_batches(data, s.batch_size, device, (ctx.dist.rank, ctx.dist.world),
                                                seq_lens=attention == VARLEN),
                steps=steps, peak_lrs=[s.lr] * len(optimizer.param_groups), warmup=min(s.warmup_steps, steps - 1),
                schedule=s.schedule, grad_clip=s.grad_clip, probe=probe, start_step=start, loss_fn=loss.fn,
                before_step=unfreeze if s.train.unfreeze and lora else None,  # a before_step ends the overlap of steps
                on_step=lambda info: ctx.emit("step", {"stage": s.name, "info": info}),
                after_step=after_step,
                sync=sync, micro_batch=s.micro_batch_size, graphs=graphs, on_out_of_memory=ctx.on_out_of_memory,
            )
    finally:
        probe.close()
        if graphs is not None:
            graphs.close()
    seconds = time.perf_counter() - t0
    teacher_name = teacher.name if teacher else None
    loss = teacher = None  # the teacher's weights go now, not at the end of the run
    mask = data.examples.attention_mask[start * s.batch_size : steps * s.batch_size]
    tail = losses[-5:]
    out: dict[str, Any] = {
        "stage": s.name, "kind": s.kind, "steps": steps, "final_loss": sum(tail) / len(tail), "attention": attention,
        "seconds": round(seconds, 2), "tokens_per_s": round(int(mask.sum()) / max(seconds, 1e-9), 1),
        "padded_tokens_per_s": round(mask.numel() / max(seconds, 1e-9), 1), "mixture": data.realised,
        "trainable_params": sum(stage_trained.values()),
    }
    if len(data.phases) > 1:
        out["phases"] = data.phases
    if teacher_name:
        out["teacher"] = teacher_name
    if selection is not None:
        chosen = sum(len(v) for v in selection.values())
        out["esft"] = {"method": ctx.esft.method, "p": ctx.esft.p, "selection": {str(k): list(v) for k, v in selection.items()},
                       "selected_share": round(chosen / max(1, n_experts * len(selection)), 4)}
    if start:
        out["resumed_at_step"] = start
    if cuda:
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out["cuda_graphs"] = graphs.summary() if graphs is not None else {"shapes": 0, "replays": 0, "off": graphs_off}
    out["eval"] = evaluate(model, ctx.eval_sets, ctx.base_tokens, ctx.dist)
    ctx.emit("stage_eval", {"stage": s.name, **out["eval"]})
    return out
