"""``dsft.train``: resolve domain, base and recipe, run the stages, save and register the adapter.

The steps, in order (each a small function here or in :mod:`dsft.recipes.stages`):
domain + recipe + data files are validated -> a run directory is opened (or, with ``resume``, the last
unfinished one is checked against this command and its checkpoint loaded) -> base loaded -> held-out
"before" loss -> term extension + LoRA attached -> stages trained, each ending with held-out domain and
general loss, ``stage.json`` and a checkpoint (and one every ``checkpoint_every`` steps) -> adapter written
to a staging directory -> version allocated, directory renamed into place and registry rows written in
one transaction.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.adapters.esft import ESFT_FILE, EXPERT_PARAMS, EsftState, save_esft
from dsft.adapters.fast_lora import fold_lora
from dsft.adapters.lora import LoraSettings, attach_lora, peft_config, target_shapes
from dsft.adapters.manifest import MANIFEST
from dsft.adapters.qlora import quantize_base
from dsft.adapters.store import write_manifest, write_weights
from dsft.adapters.terms import TERMS_FILE, TermPlan, extend_model, plan_terms, save_terms
from dsft.atomic import staging_dir, write_text_atomic
from dsft.base import DEFAULT_BASE, load_base
from dsft.base.fingerprint import summary
from dsft.base.loading import default_device
from dsft.base.sharding import adapter_tensors, gathered
from dsft.errors import UsageError
from dsft.eval.logs import write_training_log
from dsft.kernels.compile import compile_decoder_layers
from dsft.recipes.checkpoint import RunDir, RunKey, python_rng_state, restore_rng, rng_tensors, runs_dir
from dsft.recipes.distributed import Dist
from dsft.recipes.schema import Recipe, load_recipe, recipe_yaml
from dsft.eval.heldout import eval_sets, heldout_metrics
from dsft.data.user_data import load_user_data
from dsft.recipes.sources import StageData, user_recipe
from dsft.recipes.stages import Resume, StageContext, adapter_state, evaluate, restore_adapter_state, run_stage, unwrap

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


def _check_output(output: Path | None) -> None:
    if output is not None and output.exists() and not (output / MANIFEST).exists():
        if output.is_dir() and not any(output.iterdir()):
            return
        raise UsageError(f"--output {output} exists and is not a dsft adapter; choose a new directory or remove it")


def _check_teachers(rec: Recipe, domain: str, reg) -> None:
    """Fail before any work when a distill stage names a teacher adapter that is not registered."""
    for s in rec.stages:
        if s.kind == "distill" and s.distill_settings.teacher is not None:
            from dsft.errors import NotFoundError

            ref = s.distill_settings.teacher.replace("{domain}", domain)
            try:
                reg.resolve(ref)
            except NotFoundError as exc:
                raise NotFoundError(f"stage {s.name}: distill teacher {ref!r} not found ({exc}); train it first "
                                    f"(dsft train --domain {domain} --recipe lora) or set distill.teacher") from None


def _attach(model, spec, rec: Recipe):
    """The model the stages train: PEFT LoRA for LoRA recipes; for ESFT recipes the plain model (full expert
    weights) or LoRA on the routed experts only (``esft.lora``)."""
    if rec.uses_esft:
        if any(s.kind == "esft" and s.esft_settings.lora for s in rec.stages):
            settings = LoraSettings(r=rec.adapter.r, alpha=rec.adapter.alpha, targets=("routed_experts",))
            return attach_lora(model, spec, settings), None
        return model, None
    settings = LoraSettings(r=rec.adapter.r, alpha=rec.adapter.alpha, targets=rec.lora_groups or ("attention",))
    cfg = peft_config(model, spec, settings)
    return attach_lora(model, spec, settings), target_shapes(model, cfg)


def _spare_recompute(model, keep: int | str, base: str, rec: Recipe, nf4: bool, new_terms: int, device: str, dist: Dist) -> int:
    """Leave the last ``keep`` decoder layers (``auto``: as many as fit, by the planner) out of activation
    checkpointing; returns how many."""
    layers = model.get_decoder().layers
    if keep == "auto":
        keep = 0
        if not dist.enabled:  # sharded or replicated runs: per-GPU memory is not what the single-card plan assumes
            from dsft.eval.plan import PlanRequest, count_model, layers_to_keep

            big = max(rec.stages, key=lambda s: s.batch_size * s.seq_len)
            method = "esft" if rec.uses_esft else "qlora" if nf4 else "lora"
            req = PlanRequest(base=base, method=method, batch=big.batch_size, seq=big.seq_len, lora_r=rec.adapter.r,
                              new_terms=new_terms)
            card = torch.cuda.get_device_properties(torch.device(device)).total_memory
            keep = layers_to_keep(count_model(base, lora_r=rec.adapter.r), req, card)
    if keep > len(layers):
        raise UsageError(f"--keep-layers must be in 0..{len(layers)} (this base's decoder layers), got {keep}")
    for layer in list(layers)[len(layers) - keep:] if keep else []:
        layer.gradient_checkpointing = False  # keeps its activations: no recompute in backward
    return keep


def _plan(domain, base, recipe, data, overrides, seed, max_steps, output, registry, checkpoint_every, runs_root,
          eval_data=(), generated=False) -> tuple:
    """Everything checked before any weights load (so a refused run, or --resume, writes nothing)."""
    from dsft.base.loading import fingerprint_for
    from dsft.domains import resolve_domain
    from dsft.registry import open_registry

    pack = resolve_domain(domain)
    rec: Recipe = load_recipe(recipe or pack.default_recipe, overrides)
    seed = rec.seed if seed is None else seed
    if checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be >= 0, got {checkpoint_every}")
    data_files = [Path(p) for p in data]
    # user-data: the domain's files and --data, less a held-out split (or --eval-data); see data/user_data.py
    eval_files = [Path(p) for p in eval_data]
    user_records = load_user_data(pack.data_files, data_files, eval_files, generated or user_recipe(recipe))
    output = Path(output) if output else None
    _check_output(output)
    reg = registry if hasattr(registry, "transaction") else open_registry(registry)
    _check_teachers(rec, pack.name, reg)
    _, _, fingerprint = fingerprint_for(base)
    key = RunKey.build(pack.name, rec.to_data(), base, fingerprint["id"], seed, max_steps,
                       data_files + list(pack.data_files) + eval_files)
    return pack, rec, seed, data_files, user_records, output, reg, key, Path(runs_root) if runs_root else runs_dir()


def check_run(domain: str = "finance", base: str = DEFAULT_BASE, recipe: str | None = None, data: list[str | Path] | tuple = (),
              overrides: list[str] | tuple = (), seed: int | None = None, max_steps: int | None = None,
              output: str | Path | None = None, registry: Any = None, resume: bool = False,
              checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, runs_root: str | Path | None = None,
              eval_data: list[str | Path] | tuple = (), generated: bool = False) -> None:
    """The checks :func:`train` makes before loading any weights, alone: what ``dsft train --num-gpus`` runs
    before starting its processes, so that a bad argument is one error line, not one per rank.

    Raises:
        The errors :func:`train` raises for the same arguments before it trains.
    """
    *_, key, root = _plan(domain, base, recipe, data, overrides, seed, max_steps, output, registry, checkpoint_every, runs_root,
                          eval_data, generated)
    if resume:
        RunDir.for_resume(root, key)


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
    keep_layers: int | str = 0,
    on_event: Event | None = None,
    resume: bool = False,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    runs_root: str | Path | None = None,
    dist: Dist | None = None,
    eval_data: list[str | Path] | tuple = (),
    generated: bool = False,
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
            4 x 2048 tokens ~1.3 GiB more per layer, measured). ``"auto"``: as many as the planner
            (:func:`dsft.eval.plan.layers_to_keep`) fits on the card beside the run, keeping 10% spare.
        on_event: progress callback ``(kind, payload)``; kinds: base, resume, eval, stage_start, step,
            stage_eval, checkpoint, saved, warning (``{"message"}``).
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
    from dsft.domains import general_pack

    if keep_layers != "auto" and not (isinstance(keep_layers, int) and keep_layers >= 0):
        raise UsageError(f"--keep-layers must be a number >= 0 or auto, got {keep_layers!r}")
    dist = dist if dist is not None else Dist.from_env(device)
    log: list[dict[str, Any]] = []
    emit = _logging(on_event if on_event and dist.main else (lambda kind, payload: None), log)
    t_start = time.perf_counter()
    with dist.local_main_first():  # a preset is built once per machine
        pack, rec, seed, data_files, user_records, output, reg, key, root = _plan(
            domain, base, recipe, data, overrides, seed, max_steps, output, registry, checkpoint_every, runs_root,
            eval_data, generated)
    if user_records.overlap:
        emit("warning", {"message": f"{user_records.overlap} of {len(user_records.heldout)} held-out records are also "
                                    "training records: their loss measures memorisation, not the domain"})

    def find_checkpoint() -> tuple[RunDir | None, Any]:
        found = RunDir.for_resume(root, key) if resume else None
        return found, found.load_checkpoint() if found else None

    run, ckpt = dist.on_main(find_checkpoint)  # every rank resumes from rank 0's checkpoint

    target = dist.device(device) or default_device()
    nf4 = rec.quantize == "nf4"
    # QLoRA: load in bf16 on the CPU, attach LoRA, then quantise onto the GPU weight by weight (never the whole bf16 model there).
    loaded = load_base(base, device="cpu" if nf4 else target, dtype=torch.bfloat16 if nf4 and target.startswith("cuda") else None,
                       trust_remote_code=trust_remote_code)
    model, tokenizer, spec = loaded.model, loaded.tokenizer, loaded.spec
    emit("base", {"name": loaded.ref.name, "architecture": spec.architecture, "device": target,
                  **({"quantize": "nf4"} if nf4 else {})})
    if target.startswith("cuda"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    seq_len = max(s.seq_len for s in rec.stages)
    general = general_pack()
    base_sets, base_tokens = eval_sets(pack, general, tokenizer, seq_len, user_records.heldout)
    if not nf4:
        before = ckpt.state["before"] if ckpt else evaluate(model, base_sets, base_tokens, dist)

    plan = plan_terms(tokenizer, [t for t, _ in pack.terms]) if rec.adapter.terms else TermPlan((), len(tokenizer), ())
    torch.manual_seed(seed)
    extend_model(model, tokenizer, plan)
    trained_model, shapes = _attach(model, spec, rec)
    if nf4:
        report = quantize_base(trained_model, spec, device=target)
        emit("quantized", {"linears": report.linears, "expert_tensors": report.expert_tensors,
                           "mib_before": round(report.bytes_before / 2**20, 1), "mib_after": round(report.bytes_after / 2**20, 1)})
        # The 4-bit base is what trains, so it is the "before": new term rows are unused and LoRA starts at zero.
        before = ckpt.state["before"] if ckpt else evaluate(trained_model, base_sets, base_tokens, dist)
    emit("eval", {"when": "before", **before})
    if target.startswith("cuda") and not nf4 and not (dist.enabled and dist.sharding == "fsdp"):
        fold_lora(trained_model)  # expert LoRA factors ride in the expert weights' grouped GEMMs
    if target.startswith("cuda"):
        kept = _spare_recompute(model, keep_layers, base, rec, nf4, len(plan.terms), target, dist)
        emit("recompute", {"kept_layers": kept, "layers": len(model.get_decoder().layers)})
    if ckpt:  # before sharding: the checkpoint holds whole tensors
        restore_adapter_state(trained_model, ckpt.group("adapter"))
    dist.prepare(trained_model, spec)
    if model.device.type == "cuda":
        if hasattr(trained_model, "enable_input_require_grads"):
            trained_model.enable_input_require_grads()
        if compile_layers:
            compile_decoder_layers(trained_model)
    if run is None:
        run = dist.on_main(lambda: RunDir.create(root, key, recipe_yaml(rec)))

    sets, _ = eval_sets(pack, general, tokenizer, seq_len, user_records.heldout)

    def teacher(stage):
        from dsft.recipes.distill import load_teacher

        t = load_teacher(stage.distill_settings, domain=pack.name, base=base, student=trained_model,
                         student_fingerprint=loaded.fingerprint, terms=plan.terms, term_start=plan.start,
                         registry=reg, device=model.device)
        emit("teacher", {"stage": stage.name, "teacher": t.name})
        return t

    ctx = StageContext(trained_model, spec, plan, sets, base_tokens, emit, teacher_factory=teacher, dist=dist)
    stage_metrics: list[dict[str, Any]] = []
    first, resume_at, elapsed = 0, None, 0.0
    if ckpt:
        st = ckpt.state
        restore_rng(ckpt.group("rng"), st.get("python_rng"))
        ctx.esft = EsftState.from_json(st["esft"]) if st.get("esft") else None
        ctx.trained = dict(st["trained"])
        stage_metrics, log[:] = list(st["stages"]), list(st["log"])
        first, elapsed = st["stage"], float(st["elapsed"])
        if st["step"]:
            sel = st.get("stage_selection")
            resume_at = Resume(st["step"], st["losses"], ckpt.group("optim"),
                               {int(k): tuple(v) for k, v in sel.items()} if sel is not None else None)
        emit("resume", {"run": run.name, "stage": rec.stages[min(first, len(rec.stages) - 1)].name, "step": st["step"]})

    def saved(name: str) -> bool:
        """The parameters an adapter or a checkpoint reads: LoRA, term rows, and ESFT's fused expert weights."""
        return adapter_tensors(name) or (ctx.esft is not None and name.endswith(EXPERT_PARAMS))

    def save(stage: int, step: int, losses: list[float], optim: dict[str, torch.Tensor], selection) -> None:
        state = {"stage": stage, "step": step, "losses": losses, "before": before, "stages": stage_metrics, "log": log,
                 "trained": ctx.trained, "esft": ctx.esft.to_json() if ctx.esft else None,
                 "stage_selection": {str(k): list(v) for k, v in selection.items()} if selection is not None else None,
                 "elapsed": elapsed + time.perf_counter() - t_start, "python_rng": python_rng_state()}
        with gathered(trained_model, saved):  # FSDP2: whole tensors on every rank; rank 0 writes them
            adapter = {f"adapter/{k}": v for k, v in adapter_state(trained_model, spec, ctx.esft).items()}
        tensors = {**adapter, **{f"optim/{k}": v for k, v in optim.items()}, **{f"rng/{k}": v for k, v in rng_tensors().items()}}

        def write() -> None:
            path = run.save_checkpoint(state, tensors)
            emit("checkpoint", {"run": run.name, "stage": stage, "step": step, "path": str(path)})
        dist.on_main(write)

    for i, stage in enumerate(rec.stages):
        if i < first:
            continue
        steps = min(stage.steps, max_steps) if max_steps else stage.steps
        stage_data = StageData.build(stage, pack, general, tokenizer, user_records, seed + i, steps)

        def mid_stage(step, losses, optim, selection, i=i, steps=steps):
            if checkpoint_every and step % checkpoint_every == 0 and step < steps:
                save(i, step, losses, optim(), selection)

        metrics = run_stage(ctx, i, stage, stage_data, steps, resume_at if i == first else None, mid_stage)
        stage_metrics.append(metrics)
        dist.on_main(lambda i=i, stage=stage, metrics=metrics: run.write_stage(i, stage.name, metrics))
        save(i + 1, 0, [], {}, None)

    after = stage_metrics[-1]["eval"]
    emit("eval", {"when": "after", **after})
    metrics = {
        "eval_loss_before": before["domain_loss"], "eval_loss_after": after["domain_loss"],
        "eval_ppl_before": before["domain_ppl"], "eval_ppl_after": after["domain_ppl"],
        "general_loss_before": before["general_loss"], "general_loss_after": after["general_loss"],
        "ppl_reduction": round(1 - after["domain_ppl"] / before["domain_ppl"], 4),
        "trainable_params": sum(ctx.trained.values()),
        "added_tokens": len(plan.terms), "stages": stage_metrics,
        "wall_seconds": round(elapsed + time.perf_counter() - t_start, 1), "run": run.name,
    }
    metrics.update(heldout_metrics(before, after, user_records))
    if ctx.esft:
        chosen = sum(len(v) for v in ctx.esft.selection.values())
        metrics["esft"] = {**ctx.esft.to_json(), "selected_share": round(chosen / max(1, ctx.n_experts * len(ctx.esft.selection)), 4)}
    kind = ("esft" if ctx.esft else "lora") + ("+terms" if plan.terms else "")

    def publish() -> tuple[Path, str]:
        path, version = _publish(reg, trained_model, ctx.esft, plan, loaded, pack.name, kind, rec, shapes, metrics, log)
        run.finish(f"{pack.name}@{version}", path)
        if output is not None:
            _copy_out(path, output)
        return path, version

    with gathered(trained_model, saved):
        path, version = dist.on_main(publish)
    emit("saved", {"adapter": f"{pack.name}@{version}", "path": str(path)})
    return TrainResult(f"{pack.name}@{version}", path, metrics, rec.to_data())


def _logging(emit: Event, log: list[dict[str, Any]]) -> Event:
    """Pass events on, keeping each step's metrics for the adapter's training log."""
    def wrapped(kind: str, payload: dict[str, Any]) -> None:
        if kind == "step":
            i = payload["info"]
            log.append({"stage": payload["stage"], "step": i.step, "loss": i.loss, "lr": i.lr,
                        "tokens_per_s": i.tokens_per_s, "aux_loss": i.aux_loss, "imbalance": i.imbalance})
        emit(kind, payload)
    return wrapped


def _publish(reg, model, esft: EsftState | None, plan: TermPlan, loaded, domain: str, kind: str, rec: Recipe, shapes,
             metrics, log: list[dict[str, Any]]) -> tuple[Path, str]:
    """Write the adapter to a staging directory, then allocate its version, rename it into place
    and write the registry rows in one transaction; on any failure nothing is left behind."""
    from dsft.errors import NotFoundError

    with staging_dir(reg.adapters_root / domain / "new") as tmp:
        extra: dict[str, Any]
        if esft is not None:
            shapes = save_esft(tmp / ESFT_FILE, model, loaded.spec, esft.selection)
            if plan.terms:
                save_terms(tmp / TERMS_FILE, unwrap(model), plan)
            extra = {"esft": esft.to_json()}
        else:
            write_weights(tmp, model, plan)
            extra = {"lora": {"r": rec.adapter.r, "alpha": rec.adapter.alpha}}
        write_text_atomic(tmp / "recipe.yaml", recipe_yaml(rec))
        write_training_log(tmp, log)
        fields = {
            "domain": domain, "kind": kind,
            "base": {"name": loaded.ref.name, "source": loaded.ref.source, "fingerprint": summary(loaded.fingerprint)},
            "target_shapes": shapes, "added_tokens": list(plan.terms), "term_start": plan.start,
            "base_vocab_size": loaded.fingerprint["vocab_size"], "recipe": rec.to_data(), "metrics": metrics, **extra,
        }
        with reg.transaction() as tx:
            base_rec = tx.ensure_base(name=loaded.ref.name, source=loaded.ref.source,
                                      architecture=loaded.spec.architecture, fingerprint=loaded.fingerprint)
            try:
                parent = tx.resolve(domain)
            except NotFoundError:
                parent = None
            version = tx.next_adapter_version(domain=domain, base_fingerprint=loaded.fingerprint)
            manifest, sha = write_manifest(tmp, {**fields, "version": version})
            final = tx.place_dir(tmp, domain=domain, version=version)  # renamed back if the transaction fails
            tx.add_adapter(domain=domain, version=version, kind=kind, path=str(final), manifest=manifest,
                           manifest_sha256=sha, recipe=rec.to_data(), metrics=metrics, base=base_rec, parent=parent)
    return final, version


def _copy_out(path: Path, output: Path) -> None:
    """Copy the adapter to ``output``, replacing an older dsft adapter there atomically."""
    with staging_dir(output) as tmp:
        shutil.copytree(path, tmp, dirs_exist_ok=True)
        if output.exists():
            old = output.with_name(f".{output.name}.old")
            output.rename(old)
            tmp.rename(output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(output)
