"""Stage kinds in one table: what each kind reads, what it trains, its settings and its loss.

Adding a kind is one :class:`StageKind` entry in :data:`KINDS` plus its code: a loss factory and,
when the kind has settings, their dataclass and a field named after the kind on
:class:`dsft.recipes.schema.Stage` (so that a recipe says ``esft: {method: token}``).

Torch-free, like the schema that validates against it: the loss factories import the training code
only when a stage runs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from dsft.errors import UsageError

if TYPE_CHECKING:
    from dsft.recipes.schema import Stage


@dataclass(frozen=True, kw_only=True)
class EsftSettings:
    """Expert-specialised fine-tuning (Wang et al., DeepSeek, arXiv 2407.01906)."""

    method: Literal["gate", "token"] = "gate"
    """gate: average gate score per expert (ESFT-Gate); token: share of tokens routed to it (ESFT-Token)."""
    p: float | None = None
    """Per layer, the smallest set of experts whose normalised scores sum to >= p (default 0.1 gate, 0.2 token)."""
    sample_tokens: int = 131072
    """Tokens of the stage's data scored before training (the paper's 32 x 4096)."""
    lora: bool = False
    """LoRA on the selected experts instead of their full weights (merged into the saved slices)."""

    @property
    def threshold(self) -> float:
        return self.p if self.p is not None else (0.1 if self.method == "gate" else 0.2)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.p is not None and not 0 < self.p <= 1:
            problems.append(("p", f"must be in (0, 1], got {self.p}"))
        if self.sample_tokens < 1:
            problems.append(("sample_tokens", f"must be >= 1, got {self.sample_tokens}"))
        return problems


@dataclass(frozen=True, kw_only=True)
class DistillSettings:
    """Distillation: loss = alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * LM loss."""

    teacher: str | None = "{domain}"
    """A registered adapter on the teacher base (``{domain}`` = the latest adapter of this run's domain); null = the base alone."""
    teacher_base: str | None = None
    """The teacher's base (preset, directory or hub id) when not the student's; it must share the tokenizer."""
    alpha: float = 0.5
    temperature: float = 1.0

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.teacher is None and self.teacher_base is None:
            problems.append(("teacher", "set a teacher adapter, a teacher_base, or both"))
        if not 0 <= self.alpha <= 1:
            problems.append(("alpha", f"must be in [0, 1], got {self.alpha}"))
        if not self.temperature > 0:
            problems.append(("temperature", f"must be > 0, got {self.temperature}"))
        return problems


@dataclass
class StageLoss:
    """What a stage minimises: ``fn(model, batch) -> (objective, lm_loss)``, and the teacher it holds (if any)."""

    fn: Callable[[Any, dict[str, Any]], tuple[Any, Any]]
    teacher: Any = None
    """Kept here so the stage can name it in its metrics and drop its weights when the stage ends."""


TeacherFactory = Callable[["Stage"], Any]


def lm_loss(stage: Stage, teacher_factory: TeacherFactory | None) -> StageLoss:
    """The causal-LM loss on the positions that carry a label."""
    from dsft.recipes.loop import default_loss

    return StageLoss(default_loss)


def distill_loss(stage: Stage, teacher_factory: TeacherFactory | None) -> StageLoss:
    """KL to the stage's teacher plus the LM loss (:func:`dsft.recipes.distill.distill_loss`)."""
    from dsft.recipes.distill import distill_loss as objective

    if teacher_factory is None:
        raise UsageError(f"stage {stage.name}: a distill stage needs a teacher; run it through dsft train")
    teacher, d = teacher_factory(stage), stage.distill_settings

    def fn(model, batch):
        return objective(model, teacher, batch, d.alpha, d.temperature)[:2]
    return StageLoss(fn, teacher)


@dataclass(frozen=True, kw_only=True)
class StageKind:
    """One kind of stage."""

    name: str
    summary: str
    reads: Literal["text", "instruction"]
    """text: every record as plain text, loss on every token (instruction pairs joined); instruction: the
    prompt format, loss on responses only."""
    trains: Literal["lora", "experts"]
    """lora: the LoRA groups of ``train.lora``; experts: the routed experts the domain uses (ESFT). Both add
    the term rows with ``train.terms``."""
    loss: Callable[[Stage, TeacherFactory | None], StageLoss]
    settings: type | None = None
    """The dataclass of the stage field named after the kind (``esft: {...}``); None: the kind has none."""
    teacher: bool = False
    """The stage learns from a teacher model (named in its settings' ``teacher``/``teacher_base``)."""
    sources: tuple[str, ...] | None = None
    """The data sources a stage of this kind may read; None: every source."""

    def problems(self, stage: Stage) -> list[tuple[str, str]]:
        """The rules a stage of this kind must satisfy beyond the schema's types."""
        out = []
        if self.trains == "experts" and stage.train.lora:
            out.append(("train.lora", f"an {self.name} stage trains the selected experts only; set train.lora: [] "
                                      f"({self.name}.lora: true puts LoRA on the selected experts)"))
        if self.sources is not None:
            for k, phase in enumerate(stage.phases):
                for i, d in enumerate(phase.data):
                    if d.source not in self.sources:
                        out.append((f"phases[{k}].data[{i}].source", self._source_problem(d.source)))
            for i, d in enumerate(stage.data):
                if d.source not in self.sources:
                    out.append((f"data[{i}].source", self._source_problem(d.source)))
        return out

    def _source_problem(self, source: str) -> str:
        return f"a {self.name} stage reads {', '.join(self.sources or ())}, not {source!r}"


KINDS: dict[str, StageKind] = {k.name: k for k in (
    StageKind(name="cpt", summary="continued pre-training on raw text", reads="text", trains="lora", loss=lm_loss),
    StageKind(name="sft", summary="instruction tuning (loss on responses)", reads="instruction", trains="lora", loss=lm_loss),
    StageKind(name="esft", summary="train only the experts the domain routes to (instruction format)",
              reads="instruction", trains="experts", loss=lm_loss, settings=EsftSettings),
    StageKind(name="distill", summary="KL to a teacher + LM loss", reads="instruction", trains="lora", loss=distill_loss,
              settings=DistillSettings, teacher=True),
)}


def unknown_kind(name: object) -> str:
    """The problem of a stage whose kind is not in the table, naming the known ones."""
    return f"must be one of {' | '.join(repr(k) for k in KINDS)}, got {name!r}"


def stage_kind(name: str) -> StageKind:
    """The table entry of kind ``name``.

    Raises:
        UsageError: an unknown kind (the message lists the known ones).
    """
    try:
        return KINDS[name]
    except KeyError:
        raise UsageError(f"unknown stage kind {name!r}; known kinds: {', '.join(KINDS)}") from None
