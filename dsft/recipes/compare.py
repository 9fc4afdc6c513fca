"""``dsft recipes compare``: run every built-in recipe on one domain and base and tabulate the outcome.

Each recipe trains in a scratch registry and adapter directory (removed afterwards), so comparing
never adds versions to the user's registry. ``lora`` runs first: recipes with a distill stage whose
teacher is the default ``{domain}`` learn from the ``lora`` adapter of the same comparison.
"""
from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsft.base.presets import DEFAULT_BASE
from dsft.recipes.schema import builtin_recipes, load_recipe


def _order(names: Sequence[str]) -> list[str]:
    """``lora`` first, recipes with a distill stage last (they need a teacher), the rest by name."""
    def rank(name: str) -> tuple[int, str]:
        distills = any(s.kind_spec.teacher for s in load_recipe(name).stages)
        return (0 if name == "lora" else 2 if distills else 1, name)
    return sorted(names, key=rank)


def compare_recipes(domain: str = "finance", base: str = DEFAULT_BASE, recipes: Sequence[str] | None = None,
                    max_steps: int | None = None, seed: int | None = None, device: str | None = None,
                    on_event=None) -> list[dict[str, Any]]:
    """Train ``domain`` with each recipe (default: every built-in one) and measure it.

    Args:
        domain, base: as for :func:`dsft.train`.
        recipes: recipe names or YAML files (default: the built-in recipes).
        max_steps: caps every stage of every recipe (quick comparisons).
        on_event: ``(kind, payload)``; adds kind ``recipe`` ({"recipe"}) before each run and ``row`` after it.

    Returns:
        One row per recipe: held-out domain and general loss before and after, trainable parameters,
        the share of routed-expert weights trained (ESFT; None for LoRA, which adapts every expert),
        optimizer steps and wall time.
    """
    from dsft.recipes.runner import train
    from dsft.registry import open_registry

    emit = on_event or (lambda kind, payload: None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dsft-compare-") as tmp:
        reg = open_registry(f"sqlite:///{Path(tmp) / 'registry.db'}", adapters_root=Path(tmp) / "adapters")
        try:
            teachers: dict[str, str] = {}
            for name in _order(list(recipes or builtin_recipes())):
                rec = load_recipe(name)
                overrides = [f"stages.{i}.distill.teacher={teachers['lora']}" if s.distill else
                             f"stages.{i}.distill={{teacher: {teachers['lora']}}}"
                             for i, s in enumerate(rec.stages)
                             if s.kind_spec.teacher and s.distill_settings.teacher == "{domain}" and "lora" in teachers]
                emit("recipe", {"recipe": rec.name})
                result = train(domain=domain, base=base, recipe=name, overrides=overrides, seed=seed, max_steps=max_steps,
                               registry=reg, device=device, runs_root=Path(tmp) / "runs", checkpoint_every=0, on_event=on_event)
                teachers[rec.name] = result.adapter
                m = result.metrics
                row = {"recipe": rec.name, "domain_loss_before": m["eval_loss_before"], "domain_loss": m["eval_loss_after"],
                       "general_loss_before": m["general_loss_before"], "general_loss": m["general_loss_after"],
                       "trainable_params": m["trainable_params"],
                       "routed_expert_share": m["esft"]["selected_share"] if "esft" in m else None,
                       "steps": sum(s["steps"] for s in m["stages"]), "wall_seconds": m["wall_seconds"]}
                if overrides:
                    row["teacher"] = "lora"
                rows.append(row)
                emit("row", row)
        finally:
            reg.close()
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (what the README shows)."""
    lines = ["| recipe | domain loss (before -> after) | general loss (before -> after) | trainable params | routed experts trained | steps | wall time |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        share = f"{100 * r['routed_expert_share']:.1f}%" if r["routed_expert_share"] is not None else "all (LoRA)"
        name = r["recipe"] + (f" (teacher: {r['teacher']})" if r.get("teacher") else "")
        lines.append(f"| {name} | {r['domain_loss_before']:.3f} -> {r['domain_loss']:.3f} | "
                     f"{r['general_loss_before']:.3f} -> {r['general_loss']:.3f} | {r['trainable_params']:,} | {share} | "
                     f"{r['steps']} | {r['wall_seconds']:.0f} s |")
    return "\n".join(lines)
