"""The data plan of a stage: what its sources gave and what the packed steps hold, shown before training."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from dsft.data.packing import padding_share
from dsft.recipes.sizing import StepSize
from dsft.recipes.sources import StageData


@dataclass(frozen=True)
class StagePlan:
    """One stage's data, as ``dsft train`` prints it (and puts under ``stages[i].data`` in ``--json``)."""

    stage: str
    steps: int
    batch_size: int
    seq_len: int
    sources: dict[str, dict[str, Any]]
    """Per source: records per kind, examples, tokens, truncated and dropped records."""
    rows: int
    """Packed rows over the stage (steps x batch_size)."""
    padding_share: float
    mixture: dict[str, int]
    """Realised mixture: examples per source in the rows."""
    mixture_tokens: dict[str, int]
    """Realised mixture: real tokens per source in the rows."""
    heldout: int | None = None
    """Held-out examples set aside from the stage's data (None: none set aside)."""
    micro_batch_size: int | None = None
    """Rows per forward and backward on each rank (None: the whole step)."""
    sized: tuple[str, ...] = ()
    """The step fields chosen by :mod:`dsft.recipes.sizing` rather than the recipe."""

    @staticmethod
    def of(stage_name: str, data: StageData, steps: int, size: StepSize) -> StagePlan:
        ex = data.examples
        return StagePlan(stage_name, steps, size.batch_size, ex.seq_len, data.sources, len(ex),
                         round(padding_share(ex.attention_mask), 4), dict(data.realised), dict(data.realised_tokens),
                         micro_batch_size=size.micro_batch_size, sized=size.chosen)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def render(plan: dict[str, Any]) -> list[str]:
    """The plan as a few lines of text (``plan`` is :meth:`StagePlan.to_json`)."""
    micro = plan.get("micro_batch_size")
    accumulate = f" in micro-batches of {micro}" if micro and micro < plan["batch_size"] else ""
    chosen = f"; {', '.join(plan['sized'])} chosen for this device" if plan.get("sized") else ""
    lines = [f"data for stage {plan['stage']}: {plan['rows']:,} rows of {plan['seq_len']} tokens "
             f"({plan['steps']} steps x {plan['batch_size']}{accumulate}), padding {100 * plan['padding_share']:.1f}%"
             + (f", held-out {plan['heldout']:,} examples" if plan.get("heldout") is not None else "") + chosen]
    total = sum(plan["mixture_tokens"].values()) or 1
    for name, s in plan["sources"].items():
        kinds = ", ".join(f"{n:,} {k}" for k, n in s["records"].items())
        cut = (f", {s['truncated']:,} truncated" if s["truncated"] else "") + \
              (f", {s['dropped']:,} dropped (prompt fills seq_len)" if s["dropped"] else "")
        used = plan["mixture"].get(name)
        mix = (f"; in the steps {used:,} examples, {100 * plan['mixture_tokens'].get(name, 0) / total:.0f}% of tokens"
               if used is not None else "")
        lines.append(f"  {name}: {kinds} records -> {s['examples']:,} examples, {s['tokens']:,} tokens{cut}{mix}")
    return lines
