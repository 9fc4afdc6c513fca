"""``dsft.train``: resolve domain, base and recipe, run the stages, save and register the adapter.

The steps, in order (each a small function below):
domain + recipe + data files are validated -> base loaded -> held-out "before" loss ->
term extension + LoRA attached -> stages trained -> held-out "after" loss -> adapter written to a
staging directory -> version allocated, directory renamed into place and registry rows written
in one transaction.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.adapters.lora import LoraSettings, attach_lora, layer_indices, lora_targets, peft_config, target_shapes
from dsft.adapters.manifest import MANIFEST
from dsft.adapters.store import write_manifest, write_weights
from dsft.adapters.terms import TermPlan, extend_model, plan_terms
from dsft.atomic import staging_dir, write_text_atomic
from dsft.base import DEFAULT_BASE, load_base
from dsft.base.fingerprint import summary
from dsft.base.router import RouterProbe
from dsft.errors import UsageError
from dsft.eval.logs import write_training_log
from dsft.home import adapters_dir
from dsft.kernels.compile import compile_decoder_layers
from dsft.recipes.loop import heldout_loss, train_steps
from dsft.recipes.schema import Recipe, Stage, load_recipe, recipe_yaml
from dsft.data.tokenize import Examples
from dsft.recipes.sources import StageData, eval_sets, stage_batches

Event = Callable[[str, dict[str, Any]], None]


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


def _set_trainable(model, spec, stage: Stage, plan: TermPlan) -> list[list[torch.nn.Parameter]]:
    """Freeze everything, then unfreeze this stage's LoRA params and term rows; returns [lora, terms] params."""
    for p in model.parameters():
        p.requires_grad_(False)
    base_model = model.get_base_model()
    layers = layer_indices(base_model, None if stage.train.top_layers >= 1 else stage.train.top_layers)
    modules, params = lora_targets(base_model, spec, LoraSettings(targets=stage.train.lora, layers=layers))
    prefixes = tuple(m + "." for m in modules) + tuple(p.rsplit(".", 1)[0] + "." for p in params)
    lora = [p for n, p in model.named_parameters() if "lora_" in n and any(pre in n for pre in prefixes)] if prefixes else []
    terms = []
    if stage.train.terms and plan.terms:
        terms = [base_model.get_input_embeddings().rows, base_model.get_output_embeddings().rows]
    for p in lora + terms:
        p.requires_grad_(True)
    if not lora and not terms:
        raise UsageError(f"stage {stage.name}: trains nothing on this base (no matching LoRA targets and no new terms)")
    return [lora, terms]


def _run_stage(model, spec, stage: Stage, data: StageData, plan: TermPlan, seed: int, emit: Event, max_steps: int | None) -> dict[str, Any]:
    lora, terms = _set_trainable(model, spec, stage, plan)
    groups = [{"params": ps, "weight_decay": wd} for ps, wd in ((lora, stage.weight_decay), (terms, 0.0)) if ps]
    optimizer = torch.optim.AdamW(groups, lr=stage.lr, betas=(0.9, 0.99))
    steps = min(stage.steps, max_steps) if max_steps else stage.steps
    emit("stage_start", {"stage": stage.name, "steps": steps, "realised_mixture": data.realised, "trainable": sum(p.numel() for p in lora + terms)})
    probe = RouterProbe(model.get_base_model(), spec)
    torch.manual_seed(seed)
    cuda = next(model.parameters()).device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        losses = train_steps(
            model, optimizer, stage_batches(data, stage.batch_size, next(model.parameters()).device),
            steps=steps, peak_lrs=[stage.lr] * len(groups), warmup=min(stage.warmup_steps, steps - 1),
            schedule=stage.schedule, grad_clip=stage.grad_clip, probe=probe,
            on_step=lambda info: emit("step", {"stage": stage.name, "info": info}),
        )
    finally:
        probe.close()
    seconds = time.perf_counter() - t0
    mask = data.examples.attention_mask[: steps * stage.batch_size]
    out = {"stage": stage.name, "steps": steps, "final_loss": sum(losses[-5:]) / len(losses[-5:]),
           "seconds": round(seconds, 2), "tokens_per_s": round(int(mask.sum()) / seconds, 1),
           "padded_tokens_per_s": round(mask.numel() / seconds, 1), "mixture": data.realised}
    if cuda:
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def _eval(model, sets: dict[str, Examples], base_tokens: dict[str, int]) -> dict[str, float]:
    """Held-out loss per set, normalised by the *base* tokenizer's token count so before/after compare."""
    out = {}
    for name, ex in sets.items():
        r = heldout_loss(model, ex.to_dict())
        loss = r["loss"] * r["tokens"] / base_tokens[name]
        out[f"{name}_loss"] = round(loss, 5)
        out[f"{name}_ppl"] = round(float(torch.tensor(loss).exp()), 4)
    return out


def train(
    domain: str = "finance",
    base: str = DEFAULT_BASE,
    recipe: str | None = None,
    data: list[str | Path] | tuple = (),
    overrides: list[str] | tuple = (),
    seed: int | None = None,
    max_steps: int | None = None,
    output: str | Path | None = None,
    registry: str | None = None,
    device: str | None = None,
    trust_remote_code: bool = False,
    compile_layers: bool = True,
    on_event: Event | None = None,
) -> TrainResult:
    """Train a domain adapter and register it.

    Args:
        domain: a domain name (``finance``) or a domain YAML file.
        base: a preset name, a local model directory or a hub id.
        recipe: a built-in recipe name or a YAML file; default: the domain's default recipe.
        data: extra data files (JSONL, CSV, Parquet, text, or a ``save_to_disk`` directory), used by
            the recipe's ``user`` source (and added to the first stage when the recipe has none).
        overrides: dotted recipe overrides, e.g. ``["stages.0.lr=1e-4"]``.
        seed: overrides the recipe's seed; the same seed gives the same adapter.
        max_steps: caps every stage's steps (for smoke runs and benchmarks).
        output: also copy the finished adapter to this directory.
        registry: a SQLAlchemy URL; default ``$DSFT_REGISTRY_URL`` or ``$DSFT_HOME/registry.db``.
        compile_layers: on CUDA, torch.compile each decoder layer (the fast path's speed needs it).
        on_event: progress callback ``(kind, payload)``; kinds: stage_start, step, eval, saved.

    Returns:
        TrainResult with the adapter ref (``finance@0.1.0``), its directory and its metrics.
    """
    from dsft.data.files import load_records
    from dsft.domains import general_pack, resolve_domain
    from dsft.registry import open_registry

    log: list[dict[str, Any]] = []
    emit = _logging(on_event or (lambda kind, payload: None), log)
    t_start = time.perf_counter()
    pack = resolve_domain(domain)
    rec: Recipe = load_recipe(recipe or pack.default_recipe, overrides)
    seed = rec.seed if seed is None else seed
    user_records = load_records([Path(p) for p in data]) if data else []
    output = Path(output) if output else None
    _check_output(output)
    reg = open_registry(registry)

    loaded = load_base(base, device=device, trust_remote_code=trust_remote_code)
    model, tokenizer, spec = loaded.model, loaded.tokenizer, loaded.spec
    emit("base", {"name": loaded.ref.name, "architecture": spec.architecture, "device": str(model.device)})
    if model.device.type == "cuda":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    seq_len = max(s.seq_len for s in rec.stages)
    base_sets, base_tokens = eval_sets(pack, general_pack(), tokenizer, seq_len)
    before = _eval(model, base_sets, base_tokens)
    emit("eval", {"when": "before", **before})

    plan = plan_terms(tokenizer, [t for t, _ in pack.terms]) if rec.adapter.terms else TermPlan((), len(tokenizer), ())
    torch.manual_seed(seed)
    extend_model(model, tokenizer, plan)
    groups = tuple(dict.fromkeys(g for s in rec.stages for g in s.train.lora)) or ("attention",)
    settings = LoraSettings(r=rec.adapter.r, alpha=rec.adapter.alpha, targets=groups)
    lora_cfg = peft_config(model, spec, settings)
    shapes = target_shapes(model, lora_cfg)
    peft_model = attach_lora(model, spec, settings)
    if model.device.type == "cuda":
        peft_model.enable_input_require_grads()
        if compile_layers:
            compile_decoder_layers(peft_model)

    stage_metrics = []
    for i, stage in enumerate(rec.stages):
        stage_data = StageData.build(stage, pack, general_pack(), tokenizer, user_records, seed + i)
        stage_metrics.append(_run_stage(peft_model, spec, stage, stage_data, plan, seed + i, emit, max_steps))
    after_sets, _ = eval_sets(pack, general_pack(), tokenizer, seq_len)
    after = _eval(peft_model, after_sets, base_tokens)
    emit("eval", {"when": "after", **after})

    metrics = {
        "eval_loss_before": before["domain_loss"], "eval_loss_after": after["domain_loss"],
        "eval_ppl_before": before["domain_ppl"], "eval_ppl_after": after["domain_ppl"],
        "general_loss_before": before["general_loss"], "general_loss_after": after["general_loss"],
        "ppl_reduction": round(1 - after["domain_ppl"] / before["domain_ppl"], 4),
        "trainable_params": sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n) + (2 * len(plan.terms) * model.config.hidden_size),
        "added_tokens": len(plan.terms), "stages": stage_metrics,
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    kind = "lora+terms" if plan.terms else "lora"
    path, version = _publish(reg, peft_model, plan, loaded, pack.name, kind, rec, shapes, metrics, log)
    if output is not None:
        _copy_out(path, output)
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


def _publish(reg, peft_model, plan: TermPlan, loaded, domain: str, kind: str, rec: Recipe, shapes, metrics,
             log: list[dict[str, Any]]) -> tuple[Path, str]:
    """Write the adapter to a staging directory, then allocate its version, rename it into place
    and write the registry rows in one transaction; on any failure nothing is left behind."""
    from dsft.errors import NotFoundError

    with staging_dir(adapters_dir() / domain / "new") as tmp:
        write_weights(tmp, peft_model, plan)
        write_text_atomic(tmp / "recipe.yaml", recipe_yaml(rec))
        write_training_log(tmp, log)
        fields = {
            "domain": domain, "kind": kind,
            "base": {"name": loaded.ref.name, "source": loaded.ref.source, "fingerprint": summary(loaded.fingerprint)},
            "target_shapes": shapes, "added_tokens": list(plan.terms), "term_start": plan.start,
            "base_vocab_size": loaded.fingerprint["vocab_size"], "recipe": rec.to_data(), "metrics": metrics,
            "lora": {"r": rec.adapter.r, "alpha": rec.adapter.alpha},
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
