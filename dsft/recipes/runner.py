"""``dsft.train``: one domain adapter from a domain, a base and a recipe, in named steps.

1. :func:`dsft.recipes.prepare.prepare`: every check before any weights load (domain, recipe, data files, output, distill
   teachers), the base resolved once and fingerprinted, the run's key; a refused run writes nothing.
2. :meth:`Training.open_run`: with ``resume``, the last unfinished run, checked against this command,
   and its checkpoint (a new run directory is made once the model is ready).
3. :meth:`Training.load`: the base loaded, the held-out sets built and the "before" losses measured.
4. :meth:`Training.attach`: term extension and LoRA (or ESFT's expert training) attached, QLoRA
   quantisation, recompute, sharding and compilation; a checkpoint's adapter state restored.
5. :meth:`Training.run_stages`: each stage trained, ending with held-out domain and general loss,
   ``stage.json`` and a checkpoint (and one every ``checkpoint_every`` steps).
6. :meth:`Training.publish`: the adapter written to a staging directory, its version allocated, the
   directory renamed into place and the registry rows written in one transaction; the run marked done.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from dsft.adapters.esft import EXPERT_PARAMS, EsftState
from dsft.adapters.fast_lora import fold_lora
from dsft.adapters.lora import LoraSettings, attach_lora, peft_config, target_shapes
from dsft.adapters.qlora import quantize_base
from dsft.adapters.terms import TermPlan, base_logits_only, extend_model, plan_terms
from dsft.base import DEFAULT_BASE, load_base
from dsft.base.loading import default_device
from dsft.base.shard_load import adapters_off_meta, materialize, term_rows
from dsft.base.sharding import adapter_tensors, gathered
from dsft.errors import UsageError
from dsft.eval.heldout import eval_sets, heldout_metrics
from dsft.eval.tracking import parse_report_to, reachable_trackers
from dsft.kernels.compile import KEPT_MEMORY_BUDGET, compile_decoder_layers
from dsft.recipes.card_fit import fits_on_card, keep_fewer_layers, spare_recompute
from dsft.recipes.checkpoint import Checkpoint, CheckpointState, RunDir, python_rng_state, restore_rng, rng_tensors
from dsft.recipes.data_plan import StagePlan
from dsft.recipes.distributed import Dist
from dsft.recipes.prepare import RunPlan, prepare
from dsft.recipes.publish import copy_out, run_metrics
from dsft.recipes.publish import publish_trained as _publish
from dsft.recipes.run_checks import check_device, check_optimizer
from dsft.recipes.schema import Recipe, load_recipe, recipe_yaml
from dsft.recipes.sizing import SAMPLE, StepSize, size_stage, sized
from dsft.recipes.sources import StageData, example_lengths, stage_steps
from dsft.recipes.stage_state import adapter_state, restore_adapter_state
from dsft.recipes.stages import Resume, StageContext, evaluate, run_stage

Event = Callable[[str, dict[str, Any]], None]
DEFAULT_CHECKPOINT_EVERY = 50


@dataclass
class TrainResult:
    adapter: str
    path: Path
    metrics: dict[str, Any]
    recipe: dict[str, Any] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "path": str(self.path), "metrics": self.metrics}


def _attach(model, spec, rec: Recipe):
    """The model the stages train: PEFT LoRA for LoRA recipes; for ESFT recipes the plain model (full expert
    weights) or LoRA on the routed experts only (``esft.lora``)."""
    if rec.uses_esft:
        if any(s.kind_spec.trains == "experts" and s.esft_settings.lora for s in rec.stages):
            settings = LoraSettings(r=rec.adapter.r, alpha=rec.adapter.alpha, targets=("routed_experts",))
            return attach_lora(model, spec, settings), None
        return model, None
    settings = LoraSettings(r=rec.adapter.r, alpha=rec.adapter.alpha, targets=rec.lora_groups or ("attention",))
    shapes = target_shapes(model, peft_config(model, spec, settings))  # before PEFT renames what it wraps
    return attach_lora(model, spec, settings), shapes


def check_run(domain: str = "finance", base: str = DEFAULT_BASE, recipe: str | None = None, data: list[str | Path] | tuple = (),
              overrides: list[str] | tuple = (), seed: int | None = None, max_steps: int | None = None,
              output: str | Path | None = None, registry: Any = None, resume: bool = False,
              checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, runs_root: str | Path | None = None,
              trust_remote_code: bool = False, eval_data: list[str | Path] | tuple = (), generated: bool = False) -> None:
    """The checks :func:`train` makes before loading any weights, alone: what ``dsft train --num-gpus`` runs
    before starting its processes, so that a bad argument is one error line, not one per rank.

    Raises:
        The errors :func:`train` raises for the same arguments before it trains.
    """
    plan = prepare(domain, base, recipe, data, overrides, seed, max_steps, output, registry, checkpoint_every, runs_root,
                   trust_remote_code, eval_data, generated)
    try:
        if resume:
            RunDir.for_resume(plan.runs_root, plan.key)
    finally:
        plan.close()


def train(
    domain: str = "finance",
    base: str = DEFAULT_BASE,
    recipe: str | None = None,
    data: list[str | Path] | tuple = (),
    overrides: list[str] | tuple = (),
    seed: int | None = None,
    max_steps: int | None = None,
    output: str | Path | None = None,
    registry: Any = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    compile_layers: bool = True,
    keep_layers: int | str = "auto",
    recompute_attention: bool | None = None,
    on_event: Event | None = None,
    resume: bool = False,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    runs_root: str | Path | None = None,
    dist: Dist | None = None,
    eval_data: list[str | Path] | tuple = (),
    generated: bool = False,
    report_to: str = "tensorboard",
    report_to_optional: bool = False,
) -> TrainResult:
    """Train a domain adapter and register it.

    Args:
        domain: a domain name (``finance``) or a domain YAML file.
        base: a preset name, a local model directory or a hub id.
        recipe: a built-in recipe name or a YAML file; default: the domain's default recipe.
        data: extra data files (JSONL, CSV, Parquet, text, or a ``save_to_disk`` directory), used by
            the recipe's ``user`` source; like the domain's own data files (``domain.user``), they replace
            the pack's generated text in a built-in recipe (see :func:`dsft.recipes.sources.phase_weights`).
        overrides: dotted recipe overrides, e.g. ``["stages.0.lr=1e-4"]``.
        seed: overrides the recipe's seed; the same seed gives the same adapter.
        max_steps: caps every stage's steps (for smoke runs and benchmarks).
        output: also copy the finished adapter to this directory.
        registry: a SQLAlchemy URL or an open Registry; default ``$DSFT_REGISTRY_URL`` or ``$DSFT_HOME/registry.db``.
        compile_layers: on CUDA, torch.compile each decoder layer (the fast path's speed needs it).
        keep_layers: on CUDA, leave the last N decoder layers out of activation checkpointing: they keep
            their activations instead of recomputing them in backward (faster; on DeepSeek-V2-Lite at
            4 x 2048 tokens ~0.6 GiB more a compiled layer, measured). ``"auto"`` (the default): as many as the planner
            (:func:`dsft.eval.plan.keep_plan`) fits on the card beside the run, keeping 10% spare, and
            a micro-batch the recipe leaves open is sized for that (:func:`dsft.recipes.sizing.choose_micro_batch`).
        recompute_attention: the kept layers' attention recomputes its query, key and value in backward and keeps
            only the attention kernel's outputs (:mod:`dsft.kernels.attention_recompute`): ~30% less a kept layer
            for ~0.2% of a step each, so more layers keep in the same memory. None (the default): ``auto`` uses it
            where not every layer fits plainly (:func:`dsft.eval.plan.keep_plan`), a given count keeps plainly.
        on_event: progress callback ``(kind, payload)``; kinds: base, resume, eval, stage_start, step,
            stage_eval, step_eval (``eval_every``: ``{"stage", "step", "<set>_loss", "<set>_ppl"}``), checkpoint, saved,
            data_plan, warning (``{"message"}``).
        resume: continue the last unfinished run of this domain from its last checkpoint; it must have
            been started with the same recipe (and overrides), base, seed, step cap and data.
        checkpoint_every: also checkpoint every this many steps inside a stage (0: at stage ends only).
        runs_root: where run directories go (default ``$DSFT_HOME/runs``).
        dist: this process's place in a multi-process run (default: from the launcher's environment, see
            :mod:`dsft.recipes.distributed`); rank 0 alone writes and reports events, every rank returns
            the same result.
        eval_data: held-out files to measure the adapter on; without them a deterministic share of the
            user's data is held out (:func:`dsft.data.split.split_heldout`) and never trains.
        generated: train on the pack's generated template text too when user data exists.

    Returns:
        TrainResult with the adapter ref (``finance@0.1.0``), its directory and its metrics.

    Raises:
        NotFoundError: unknown domain, recipe, base or teacher; ``resume`` without a checkpoint.
        UsageError: a bad recipe, override or output; ``resume`` of a run with other settings.
        DataError: a bad data file.
    """
    if keep_layers != "auto" and not (isinstance(keep_layers, int) and keep_layers >= 0):
        raise UsageError(f"--keep-layers must be a number >= 0 or auto, got {keep_layers!r}")
    if recompute_attention and keep_layers == 0:
        raise UsageError("--recompute-attention acts on the layers --keep-layers keeps, and --keep-layers 0 keeps none: "
                         "drop one of the two")
    check_device(device)
    trackers, tracking_warnings = reachable_trackers(parse_report_to(report_to), report_to_optional)
    dist = dist if dist is not None else Dist.from_env(device)
    started = time.perf_counter()
    with dist.local_main_first():  # a preset is built once per machine
        plan = prepare(domain, base, recipe, data, overrides, seed, max_steps, output, registry, checkpoint_every, runs_root,
                       trust_remote_code, eval_data, generated)
    try:
        run = Training(plan, dist, Events(on_event if dist.main else None), device, started)
        for message in tracking_warnings:
            run.emit("warning", {"message": message})
        user = plan.user_records
        if user.overlap:
            run.emit("warning", {"message": f"{user.overlap} of {len(user.heldout)} held-out records are also "
                                            "training records: their loss measures memorisation, not the domain"})
        run.open_run(resume)
        run.load(trust_remote_code, keep_layers == "auto")
        run.attach(keep_layers, compile_layers, recompute_attention)
        run.track(trackers)
        result = None
        try:
            run.run_stages()
            result = run.publish()
            return result
        finally:
            run.untrack(result.adapter if result else None)
    finally:
        plan.close()


class Events:
    """Passes progress events on (to nobody when ``on_event`` is None), keeping each step's metrics in
    ``log`` for the adapter's training log."""

    def __init__(self, on_event: Event | None):
        self.on_event = on_event
        self.log: list[dict[str, Any]] = []
        self.listeners: list[Event] = []
        """Also told every event (live trackers)."""

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "step":
            i = payload["info"]
            self.log.append({"stage": payload["stage"], "step": i.step, "loss": i.loss, "lr": i.lr,
                             "tokens_per_s": i.tokens_per_s, "aux_loss": i.aux_loss, "imbalance": i.imbalance})
        elif kind == "step_eval" and self.log and (self.log[-1]["stage"], self.log[-1]["step"]) == (payload["stage"], payload["step"]):
            self.log[-1]["heldout"] = {k: v for k, v in payload.items() if k.endswith("_loss")}  # on its step's record
        for listen in self.listeners:
            listen(kind, payload)
        if self.on_event is not None:
            self.on_event(kind, payload)


class Training:
    """One :func:`train` call after :func:`prepare`: its steps (see the module docstring) and what they share."""

    def __init__(self, plan: RunPlan, dist: Dist, emit: Events, device: str | None, started: float):
        self.plan, self.dist, self.emit, self.started = plan, dist, emit, started
        self.target = dist.device(device) or default_device()
        self.nf4 = plan.recipe.quantize == "nf4"
        check_optimizer(plan.recipe.optimizer, dist.sharding if dist.enabled else "none")  # before the base loads
        self.run: RunDir | None = None
        self.ckpt: Checkpoint | None = None
        self.stage_metrics: list[dict[str, Any]] = []
        self.recompute: dict[str, int] = {}
        """On a GPU: ``{"kept_layers", "layers", "attention_recomputed"}``, the decoder layers out of activation
        checkpointing and whether their attention recomputes its inputs (and ``"out_of_memory_with"``: how many
        were kept when a step last ran out of memory and half of them went back in)."""
        self.keep_auto = False
        """The kept layers are the planner's choice (``--keep-layers auto``), not the user's."""
        self.elapsed_before = 0.0
        """Seconds trained by the processes before a resume."""

    @property
    def cuda(self) -> bool:
        return self.target.startswith("cuda")

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    # --- 2. open_run -----------------------------------------------------------------------------

    def open_run(self, resume: bool) -> None:
        """With ``resume``: the run to continue and its checkpoint; every rank resumes from rank 0's."""
        def find() -> tuple[RunDir | None, Checkpoint | None]:
            found = RunDir.for_resume(self.plan.runs_root, self.plan.key) if resume else None
            return found, found.load_checkpoint() if found else None
        self.run, self.ckpt = self.dist.on_main(find)

    # --- 3. load ---------------------------------------------------------------------------------

    def load(self, trust_remote_code: bool, keep_auto: bool = False) -> None:
        """The base, the held-out sets and, unless 4-bit (see :meth:`attach`), the "before" losses. ``keep_auto``:
        the run keeps as many layers' activations as fit (``--keep-layers auto``), which sizes its micro-batches."""
        from dsft.domains import general_pack

        plan = self.plan
        # FSDP: the base is built on the meta device and each rank reads its own shard once the adapters are
        # attached and the model sharded (:meth:`attach`), so no rank ever holds the whole base. Not for
        # QLoRA (quantised from a whole bf16 copy) nor for an ESFT resume (whole expert tensors restored before sharding).
        self.sharded_load = self.dist.enabled and self.dist.sharding == "fsdp" and not self.nf4 \
            and not (self.ckpt is not None and plan.recipe.uses_esft)
        # QLoRA: load in bf16 on the CPU, attach LoRA, then quantise onto the GPU weight by weight (never the whole bf16 model there).
        self.loaded = load_base(plan.base, device="cpu" if self.nf4 else self.target,
                                dtype=torch.bfloat16 if self.nf4 and self.cuda else None, trust_remote_code=trust_remote_code,
                                meta=self.sharded_load)
        self.model, self.tokenizer, self.spec = self.loaded.model, self.loaded.tokenizer, self.loaded.spec
        self.emit("base", {"name": self.loaded.ref.name, "architecture": self.spec.architecture, "device": self.target,
                           **({"quantize": "nf4"} if self.nf4 else {}), **({"sharded_load": True} if self.sharded_load else {})})
        if self.cuda:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.general = general_pack()
        self.sizes = self._size_steps(keep_auto)
        plan = self.plan = replace(plan, recipe=sized(plan.recipe, self.sizes))
        self.seq_len = max(s.seq_len for s in plan.recipe.stages)
        self.base_sets, self.base_tokens = eval_sets(plan.pack, self.general, self.tokenizer, self.seq_len,
                                                     plan.user_records.heldout)
        if not self.nf4 and not self.sharded_load:
            self.before = self._before(self.model)

    def _size_steps(self, keep_auto: bool) -> list[StepSize]:
        """Each stage's seq_len, rows per step and micro-batch (:mod:`dsft.recipes.sizing`), fixed for the run:
        a resumed run keeps the sizes it started with, whatever card it resumes on."""
        plan, world = self.plan, self.dist.world if self.dist.enabled else 1
        if self.run is not None and (self.run.path / "recipe.yaml").exists():
            ran = load_recipe(str(self.run.path / "recipe.yaml")).stages
            return [StepSize(s.seq_len, s.batch_size, s.micro_batch_size or -(-s.batch_size // world), (), world) for s in ran]
        context = getattr(self.model.config, "max_position_embeddings", None)
        sharded = self.dist.world if self.dist.sharding == "fsdp" else 1
        fits = fits_on_card(self.plan.base, self.plan.recipe, self.nf4, self._new_terms(), self.target, sharded) if self.cuda else None
        # as spare_recompute: several processes or a 4-bit base keep every layer recomputing
        fits_kept = partial(fits, checkpointing=False) if fits and keep_auto and not self.dist.enabled and not self.nf4 else None
        return [size_stage(s, cuda=self.cuda, context=context, fits=fits, fits_kept=fits_kept, world=world,
                           lengths=partial(example_lengths, s, plan.pack, self.general, self.tokenizer, plan.user_records, SAMPLE))
                for s in plan.recipe.stages]

    def _new_terms(self) -> int:
        """Tokens the run will add (two forms per term), before they are planned: for the memory model."""
        return 2 * len(self.plan.pack.terms) if self.plan.recipe.adapter.terms else 0

    def _before(self, model) -> dict[str, float]:
        if self.ckpt:
            return self.ckpt.state.before
        from dsft.eval.base_cache import base_key

        # QLoRA measures its 4-bit base with LoRA and the term rows attached (new logits in the head): not the base alone
        key = None if self.nf4 else base_key(self.loaded.fingerprint["id"], model)
        return evaluate(model, self.base_sets, self.base_tokens, self.dist, key)

    # --- 4. attach -------------------------------------------------------------------------------

    def attach(self, keep_layers: int | str, compile_layers: bool, recompute_attention: bool | None = None) -> None:
        """Terms and LoRA (or ESFT) on the model, made ready to train on its device; the run directory made."""
        plan, rec, model, dist = self.plan, self.plan.recipe, self.model, self.dist
        self.terms = plan_terms(self.tokenizer, [t for t, _ in plan.pack.terms]) if rec.adapter.terms \
            else TermPlan((), len(self.tokenizer), ())
        torch.manual_seed(plan.seed)
        weights = self.loaded.weights
        # Each rank's shard goes straight onto its device (the CPU under FSDP2's CPU offload, where the shards live)
        shard_device = "cpu" if dist.fsdp.offload else self.target
        # A meta base: the term rows' initial values are read from the weights, LoRA is made on the CPU as in one process.
        extend_model(model, self.tokenizer, self.terms,
                     term_rows(model, weights, self.terms.pieces, shard_device) if weights is not None and self.terms.terms else None)
        with adapters_off_meta() if weights is not None else nullcontext():
            self.trained_model, self.shapes = _attach(model, self.spec, rec)
        if self.nf4:
            report = quantize_base(self.trained_model, self.spec, device=self.target)
            self.emit("quantized", {"linears": report.linears, "expert_tensors": report.expert_tensors,
                                    "mib_before": round(report.bytes_before / 2**20, 1), "mib_after": round(report.bytes_after / 2**20, 1)})
            # The 4-bit base is what trains, so it is the "before": new term rows are unused and LoRA starts at zero.
            self.before = self._before(self.trained_model)
        if weights is None:
            self.emit("eval", {"when": "before", **self.before})
        if self.cuda and not self.nf4 and not (dist.enabled and dist.sharding == "fsdp"):
            fold_lora(self.trained_model)  # expert LoRA factors ride in the expert weights' grouped GEMMs
        if self.cuda:
            kept, lean = spare_recompute(model, keep_layers, plan.base, rec, self.nf4, len(self.terms.terms), self.target,
                                         dist, compiled=compile_layers, attention=recompute_attention)
            self.recompute = {"kept_layers": kept, "layers": len(model.get_decoder().layers), "attention_recomputed": lean}
            self.keep_auto = keep_layers == "auto"
            self.emit("recompute", self.recompute)
        if self.ckpt:  # before sharding: the checkpoint holds whole tensors
            restore_adapter_state(self.trained_model, self.ckpt.group("adapter"))
        dist.prepare(self.trained_model, self.spec)
        if weights is not None:
            materialize(self.trained_model, weights, shard_device)
            with base_logits_only(self.trained_model):  # the base's "before": LoRA is still zero, the term rows unused
                self.before = self._before(self.trained_model)
            self.emit("eval", {"when": "before", **self.before})
        if model.device.type == "cuda":
            if hasattr(self.trained_model, "enable_input_require_grads"):
                self.trained_model.enable_input_require_grads()
            if compile_layers:
                kept = (self.recompute or {}).get("kept_layers", 0)
                compile_decoder_layers(self.trained_model, KEPT_MEMORY_BUDGET if kept else None)
        if self.run is None:
            self.run = dist.on_main(lambda: RunDir.create(plan.runs_root, plan.key, recipe_yaml(rec)))

    def _keep_fewer_layers(self) -> bool:
        """A step ran out of GPU memory: if the planner kept layers' activations (``--keep-layers auto``), half of
        them keep them from now on and the step runs again (True); a count the user gave stands (False)."""
        record = keep_fewer_layers(self.model, self.recompute) if self.keep_auto else None
        if record is None:
            return False
        self.recompute = record
        now = f"{record['kept_layers']} keep them" if record["kept_layers"] else "every layer recomputes its activations"
        self.emit("warning", {"message": f"out of GPU memory with {record['out_of_memory_with']} layers keeping their "
                                         f"activations (--keep-layers auto planned them): {now} from now on"})
        return True

    def track(self, names: tuple[str, ...]) -> None:
        """Live tracking (:mod:`dsft.eval.tracking`) into the run directory's ``tracking/``, on the main rank."""
        self.tracker = None
        if not names or not self.dist.main:
            return
        from dsft.eval.tracking import RunTracker

        plan = self.plan
        params = {"domain": plan.pack.name, "base": plan.base.name, "seed": plan.seed, "recipe": plan.recipe.to_data()}
        self.tracker = RunTracker(names, self.run.name, self.run.path / "tracking", params,
                                  tags={"dsft.domain": plan.pack.name, "dsft.base": plan.base.name},
                                  on_warning=lambda message: self.emit("warning", {"message": message}))
        self.tracker.log({f"eval/{k}_before": v for k, v in self.before.items() if isinstance(v, (int, float))})
        self.emit.listeners.append(self.tracker)

    def untrack(self, adapter: str | None) -> None:
        """Close the trackers, recording the adapter's ref when one was registered."""
        tracker, self.tracker = getattr(self, "tracker", None), None
        if tracker is not None:
            self.emit.listeners.remove(tracker)
            tracker.finish(adapter)

    # --- 5. run_stages ---------------------------------------------------------------------------

    def run_stages(self) -> None:
        """Train the stages not finished yet, each ending with its metrics and a checkpoint."""
        plan = self.plan
        sets, _ = eval_sets(plan.pack, self.general, self.tokenizer, self.seq_len,  # now with the added terms
                            plan.user_records.heldout)
        self.ctx = StageContext(self.trained_model, self.spec, self.terms, sets, self.base_tokens, self.emit,
                                teacher_factory=self._teacher, dist=self.dist, optimizer=plan.recipe.optimizer,
                                eval_every=plan.recipe.eval_every,
                                on_out_of_memory=self._keep_fewer_layers)
        first, resume_at = self._restore_progress()
        for i, stage in enumerate(plan.recipe.stages[first:], start=first):
            steps = stage_steps(stage, plan.pack, self.general, self.tokenizer, plan.user_records)
            steps = min(steps, plan.max_steps) if plan.max_steps else steps
            data = StageData.build(stage, plan.pack, self.general, self.tokenizer, plan.user_records, plan.seed + i, steps)
            data_plan = StagePlan.of(stage.name, data, steps, self.sizes[i]).to_json()
            self.emit("data_plan", data_plan)
            metrics = run_stage(self.ctx, i, stage, data, steps, resume_at if i == first else None,
                                partial(self._mid_stage, i, steps))
            metrics["data"] = data_plan
            if self.recompute:  # on a GPU: the layers that kept their activations (--keep-layers)
                metrics["recompute"] = self.recompute
            self.stage_metrics.append(metrics)
            self.dist.on_main(partial(self.run.write_stage, i, stage.name, metrics))
            self._checkpoint(i + 1, 0, [], {}, None)

    def _restore_progress(self) -> tuple[int, Resume | None]:
        """From a checkpoint: the RNG, the metrics and log so far; returns the stage to start at and where in it."""
        if not self.ckpt:
            return 0, None
        st = self.ckpt.state
        restore_rng(self.ckpt.group("rng"), st.python_rng)
        self.ctx.esft = EsftState.from_json(st.esft.to_json()) if st.esft else None  # a copy: the stages extend it
        self.ctx.trained = dict(st.trained)
        self.stage_metrics, self.emit.log[:] = list(st.stage_metrics), list(st.log)
        self.elapsed_before = st.elapsed
        resume_at = Resume(st.step, list(st.losses), self.ckpt.group("optim"), st.selection) if st.step else None
        stages = self.plan.recipe.stages
        self.emit("resume", {"run": self.run.name, "stage": stages[min(st.stage, len(stages) - 1)].name, "step": st.step,
                             "steps_done": sum(m["steps"] for m in self.stage_metrics) + st.step})
        return st.stage, resume_at

    def _mid_stage(self, stage: int, steps: int, step: int, losses: list[float], optim: Callable[[], dict[str, torch.Tensor]],
                   selection: dict[int, tuple[int, ...]] | None) -> None:
        """After each step of a stage: a checkpoint every ``checkpoint_every`` steps (its end has its own)."""
        every = self.plan.checkpoint_every
        if every and step % every == 0 and step < steps:
            self._checkpoint(stage, step, losses, optim(), selection)

    def _checkpoint(self, stage: int, step: int, losses: list[float], optim: dict[str, torch.Tensor],
                    selection: dict[int, tuple[int, ...]] | None) -> None:
        """Write a checkpoint at ``step`` of stage ``stage``: every rank gathers the tensors, rank 0 writes."""
        ctx = self.ctx
        state = CheckpointState(stage=stage, step=step, losses=tuple(losses), before=self.before,
                                stage_metrics=tuple(self.stage_metrics), log=tuple(self.emit.log), trained=dict(ctx.trained),
                                esft=ctx.esft, selection=selection, elapsed=self.elapsed(), python_rng=python_rng_state())
        with gathered(self.trained_model, self._saved):  # FSDP2: whole tensors on every rank; rank 0 writes them
            adapter = {f"adapter/{k}": v for k, v in adapter_state(self.trained_model, self.spec, ctx.esft).items()}
        tensors = {**adapter, **{f"optim/{k}": v for k, v in optim.items()}, **{f"rng/{k}": v for k, v in rng_tensors().items()}}

        def write() -> None:
            path = self.run.save_checkpoint(state, tensors)
            self.emit("checkpoint", {"run": self.run.name, "stage": stage, "step": step, "path": str(path)})
        self.dist.on_main(write)

    def _saved(self, name: str) -> bool:
        """The parameters an adapter or a checkpoint reads: LoRA, term rows, and ESFT's fused expert weights."""
        return adapter_tensors(name) or (self.ctx.esft is not None and name.endswith(EXPERT_PARAMS))

    def _teacher(self, stage):
        """A distill stage's teacher (the kinds table asks for it when the stage starts)."""
        from dsft.recipes.distill import load_teacher

        t = load_teacher(stage.distill_settings, domain=self.plan.pack.name, base=self.plan.base, student=self.trained_model,
                         student_fingerprint=self.loaded.fingerprint, terms=self.terms.terms, term_start=self.terms.start,
                         registry=self.plan.registry, device=self.model.device)
        self.emit("teacher", {"stage": stage.name, "teacher": t.name})
        return t

    # --- 6. publish ------------------------------------------------------------------------------

    def publish(self) -> TrainResult:
        """Save and register the adapter (rank 0; every rank returns the same result)."""
        plan, ctx = self.plan, self.ctx
        after = self.stage_metrics[-1]["eval"]
        self.emit("eval", {"when": "after", **after})
        metrics = run_metrics(self.before, self.stage_metrics, ctx.trained, self.terms, ctx.esft, ctx.n_experts,
                              self.elapsed(), self.run.name)
        metrics.update(heldout_metrics(self.before, after, plan.user_records))
        kind = ("esft" if ctx.esft else "lora") + ("+terms" if self.terms.terms else "")
        domain = plan.pack.name

        def write() -> tuple[Path, str]:
            path, version = _publish(plan.registry, self.trained_model, ctx.esft, self.terms, self.loaded, domain, kind,
                                     plan.recipe, self.shapes, metrics, self.emit.log)
            self.run.finish(f"{domain}@{version}", path)
            if plan.output is not None:
                copy_out(path, plan.output)
            return path, version

        with gathered(self.trained_model, self._saved):
            path, version = self.dist.on_main(write)
        self.emit("saved", {"adapter": f"{domain}@{version}", "path": str(path)})
        return TrainResult(f"{domain}@{version}", path, metrics, plan.recipe.to_data())

