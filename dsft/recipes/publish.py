"""Publishing an adapter: stage its files, then version, place and register it in one transaction.

Training (:func:`publish_trained`) and the test fixtures (:mod:`dsft.testing.adapters`) go through the
same :func:`publish_adapter`, so a fixture adapter is registered exactly as a trained one is. On any
failure nothing is left behind: the staging directory is removed and the transaction rolls the
directory rename back.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsft.adapter_format import ESFT_FILE, RECIPE_FILE, TERMS_FILE
from dsft.adapters.card import CARD_FILE, hub_name, model_card, point_peft_config_at
from dsft.adapters.esft import EsftState, save_esft
from dsft.adapters.store import write_manifest, write_weights
from dsft.adapters.terms import TermPlan, save_terms
from dsft.atomic import fsync_dir, staging_dir, write_text_atomic
from dsft.base.fingerprint import summary
from dsft.errors import NotFoundError
from dsft.eval.logs import write_training_log
from dsft.recipes.schema import recipe_yaml
from dsft.recipes.stage_state import unwrap


@dataclass(frozen=True)
class TrainedOn:
    """The base an adapter is registered against (its manifest's ``base``)."""

    name: str
    source: str
    fingerprint: Mapping[str, Any]
    architecture: str | None = None

    @classmethod
    def of(cls, loaded) -> TrainedOn:
        """The base of a :class:`dsft.base.loading.LoadedBase`."""
        return cls(loaded.ref.name, loaded.ref.source, loaded.fingerprint, loaded.spec.architecture)


def publish_adapter(reg, domain: str, kind: str, base: TrainedOn, write_files: Callable[[Path], Mapping[str, Any]], *,
                    recipe: Mapping[str, Any], metrics: Mapping[str, Any], link_parent: bool = True):
    """Write an adapter through ``write_files`` into a staging directory, then register it.

    Args:
        reg: an open :class:`dsft.registry.Registry`.
        domain, kind: what it is registered as (e.g. ``finance``, ``lora+terms``).
        base: the base it was trained on.
        write_files: writes the adapter's files into the directory it is given and returns the
            manifest fields only it knows (``target_shapes``, ``added_tokens``, ``term_start``, ``lora``/``esft``).
        recipe, metrics: recorded in the manifest and the registry row.
        link_parent: record the domain's current latest version as the parent (training's lineage).
    Returns:
        The registered :class:`dsft.registry.AdapterRecord` (its ``path`` is the final directory).
    Raises:
        IntegrityError: the fields do not make a valid manifest; UsageError / IncompatibleError from the registry.
    """
    with staging_dir(reg.adapters_root / domain / "new") as tmp:
        fields = {
            "domain": domain, "kind": kind,
            "base": {"name": base.name, "source": base.source, "fingerprint": summary(base.fingerprint)},
            "base_vocab_size": base.fingerprint["vocab_size"], "recipe": dict(recipe), "metrics": dict(metrics),
            **write_files(tmp),
        }
        with reg.transaction() as tx:
            base_rec = tx.ensure_base(name=base.name, source=base.source, architecture=base.architecture,
                                      fingerprint=base.fingerprint)
            parent = None
            if link_parent:
                try:
                    parent = tx.resolve(domain)
                except NotFoundError:
                    parent = None
            version = tx.next_adapter_version(domain=domain, base_fingerprint=base.fingerprint)
            hub = hub_name(base.name, base.source)
            point_peft_config_at(tmp, hub)
            write_text_atomic(tmp / CARD_FILE, model_card(
                ref=f"{domain}@{version}", kind=kind, base=hub, base_fingerprint=str(base.fingerprint.get("id", "")),
                metrics=metrics, recipe=recipe, added_tokens=len(fields.get("added_tokens") or ())))
            manifest, sha = write_manifest(tmp, {**fields, "version": version})
            final = tx.place_dir(tmp, domain=domain, version=version)  # renamed back if the transaction fails
            return tx.add_adapter(domain=domain, version=version, kind=kind, path=str(final), manifest=manifest.to_dict(),
                                  manifest_sha256=sha, recipe=recipe, metrics=metrics, base=base_rec, parent=parent)


def publish_trained(reg, model, esft, plan: TermPlan, loaded, domain: str, kind: str, rec, shapes,
                    metrics, log: list[dict[str, Any]]) -> tuple[Path, str]:
    """Publish what a training run made: PEFT files or ESFT slices, term rows, the recipe and the log.

    Args:
        model: the trained model (a PeftModel, or the base itself for ESFT).
        esft: the run's :class:`dsft.adapters.esft.EsftState`, or None for LoRA.
        plan: the added terms; loaded: the base; rec: the resolved :class:`dsft.recipes.schema.Recipe`.
        shapes: the LoRA target shapes (ESFT computes its own).
        log: each step's metrics (written as the training log).
    Returns:
        (the adapter's directory, its version).
    """
    def write_files(tmp: Path) -> dict[str, Any]:
        if esft is not None:
            targets = save_esft(tmp / ESFT_FILE, model, loaded.spec, esft.selection)
            if plan.terms:
                save_terms(tmp / TERMS_FILE, unwrap(model), plan)
            extra: dict[str, Any] = {"esft": esft.to_json()}
        else:
            write_weights(tmp, model, plan)
            targets, extra = shapes, {"lora": {"r": rec.adapter.r, "alpha": rec.adapter.alpha}}
        write_text_atomic(tmp / RECIPE_FILE, recipe_yaml(rec))
        write_training_log(tmp, log)
        return {"target_shapes": targets, "added_tokens": list(plan.terms), "term_start": plan.start, **extra}

    record = publish_adapter(reg, domain, kind, TrainedOn.of(loaded), write_files, recipe=rec.to_data(), metrics=metrics)
    return Path(record.path), record.version


def run_metrics(before: dict[str, float], stages: list[dict[str, Any]], trained: dict[str, int], terms: TermPlan,
                esft: EsftState | None, n_experts: int, seconds: float, run: str) -> dict[str, Any]:
    """The adapter's metrics: held-out figures before and after, size, stages, wall time."""
    after = stages[-1]["eval"]
    metrics = {
        "eval_loss_before": before["domain_loss"], "eval_loss_after": after["domain_loss"],
        "eval_ppl_before": before["domain_ppl"], "eval_ppl_after": after["domain_ppl"],
        "general_loss_before": before["general_loss"], "general_loss_after": after["general_loss"],
        "ppl_reduction": round(1 - after["domain_ppl"] / before["domain_ppl"], 4),
        "trainable_params": sum(trained.values()),
        "added_tokens": len(terms.terms), "stages": stages,
        "wall_seconds": round(seconds, 1), "run": run,
    }
    if esft:
        chosen = sum(len(v) for v in esft.selection.values())
        metrics["esft"] = {**esft.to_json(), "selected_share": round(chosen / max(1, n_experts * len(esft.selection)), 4)}
    return metrics


def copy_out(path: Path, output: Path) -> None:
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
    fsync_dir(output.parent)
