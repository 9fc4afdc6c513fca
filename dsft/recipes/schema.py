"""A recipe: a YAML file of stages, loaded into a frozen dataclass tree and validated before any work."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, Literal

import yaml

from dsft import safe_yaml
from dsft.adapter_format import LORA_GROUPS
from dsft.errors import NotFoundError, show
from dsft.recipes.kinds import KINDS, DistillSettings, EsftSettings, StageKind, stage_kind, unknown_kind
from dsft.recipes.typed import apply_override, load_tree, to_data

BUILTIN_DIR = Path(__file__).parent / "builtin"
DATA_SOURCES = ("domain.raw", "domain.instruct", "domain.longtail", "general.raw", "domain.user", "user")
"""Named sources; ``domain.user`` is the domain's own data files (``dsft domains new --data``), ``user`` the
files given with ``--data``; ``file:PATH`` names a file directly."""

FRACTION_TOLERANCE = 1e-6


@dataclass(frozen=True, kw_only=True)
class DataSource:
    source: str
    """One of domain.raw, domain.instruct, domain.longtail, general.raw, domain.user, user, or file:PATH."""
    weight: float = 1.0
    """Relative weight (> 0) in the stage's mixture; weights need not sum to 1."""

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.source not in DATA_SOURCES and not self.source.startswith("file:"):
            problems.append(("source", f"must be one of {', '.join(DATA_SOURCES)} or file:PATH, got {self.source!r}"))
        if not (self.weight > 0 and math.isfinite(self.weight)):
            problems.append(("weight", f"must be > 0, got {self.weight}"))
        return problems


@dataclass(frozen=True, kw_only=True)
class Phase:
    """One phase of a data curriculum: a share of the stage's steps with its own mixture."""

    name: str
    fraction: float
    """Share of the stage's steps (the phases of a stage sum to 1)."""
    data: tuple[DataSource, ...]

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not 0 < self.fraction <= 1:
            problems.append(("fraction", f"must be in (0, 1], got {self.fraction}"))
        if not self.data:
            problems.append(("data", "must list at least one source"))
        return problems


@dataclass(frozen=True, kw_only=True)
class Unfreeze:
    """A point of a progressive-unfreezing schedule."""

    at: float
    """From this share of the stage's steps on (0 = the first step) ..."""
    top_layers: float
    """... LoRA trains on this fraction of the decoder layers, counted from the top."""

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not 0 <= self.at < 1:
            problems.append(("at", f"must be in [0, 1), got {self.at}"))
        if not 0 < self.top_layers <= 1:
            problems.append(("top_layers", f"must be in (0, 1], got {self.top_layers}"))
        return problems


@dataclass(frozen=True, kw_only=True)
class Trainable:
    """What a stage trains."""

    lora: tuple[str, ...] = LORA_GROUPS
    """LoRA target groups: attention, shared_experts, routed_experts (empty: no LoRA)."""
    top_layers: float = 1.0
    """Fraction of decoder layers, counted from the top, that get LoRA (1.0 = all)."""
    unfreeze: tuple[Unfreeze, ...] = ()
    """Progressive unfreezing from the top layers down; replaces ``top_layers`` when given."""
    terms: bool = True
    """Train the term-embedding rows of the domain's new tokens."""

    def check(self) -> list[tuple[str, str]]:
        problems = []
        bad = [t for t in self.lora if t not in LORA_GROUPS]
        if bad:
            problems.append(("lora", f"unknown group {bad[0]!r}; choose from {', '.join(LORA_GROUPS)}"))
        if not 0 < self.top_layers <= 1:
            problems.append(("top_layers", f"must be in (0, 1], got {self.top_layers}"))
        if self.unfreeze:
            ats = [u.at for u in self.unfreeze]
            tops = [u.top_layers for u in self.unfreeze]
            if ats[0] != 0:
                problems.append(("unfreeze[0].at", f"the schedule must start at 0, got {ats[0]}"))
            if any(b <= a for a, b in pairwise(ats)):
                problems.append(("unfreeze", f"'at' must increase, got {ats}"))
            if any(b < a for a, b in pairwise(tops)):
                problems.append(("unfreeze", f"top_layers must not shrink (layers unfreeze from the top down), got {tops}"))
        return problems

    def top_layers_at(self, step: int, steps: int) -> float:
        """The fraction of layers (from the top) whose LoRA trains at ``step`` of ``steps``."""
        top = self.top_layers
        for u in self.unfreeze:
            if step >= round(u.at * steps):
                top = u.top_layers
        return top

    @property
    def max_top_layers(self) -> float:
        return max([self.top_layers] if not self.unfreeze else [u.top_layers for u in self.unfreeze])


@dataclass(frozen=True, kw_only=True)
class Stage:
    name: str
    kind: str
    """One of :data:`dsft.recipes.kinds.KINDS`: cpt: continued pre-training on raw text; sft: instruction
    tuning (loss on responses); esft: train only the experts the domain routes to (instruction format);
    distill: KL to a teacher + LM loss."""
    data: tuple[DataSource, ...] = ()
    """The stage's data mixture (or give ``phases``)."""
    phases: tuple[Phase, ...] = ()
    """A data curriculum: consecutive phases, each a share of the steps with its own mixture."""
    replay: float = 0.0
    """Share of every phase's examples drawn from general.raw (replay limits forgetting); 0 = none."""
    lr: float
    steps: int | None = None
    epochs: float | None = None
    """Instead of ``steps``: passes over the stage's examples (steps = epochs x packed rows / batch_size)."""
    train: Trainable = field(default_factory=Trainable)
    esft: EsftSettings | None = None
    """ESFT settings (kind esft only; defaults when omitted)."""
    distill: DistillSettings | None = None
    """Distillation settings (kind distill only; defaults when omitted)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    batch_size: int | None = None
    """Rows per optimizer step (the global batch). Left out: 8 on the CPU; on a GPU ``tokens_per_step / seq_len``
    (see :mod:`dsft.recipes.sizing`)."""
    seq_len: int | None = None
    """Tokens per row. Left out: 128 on the CPU; on a GPU the data's 99th percentile example length, rounded up to 256."""
    tokens_per_step: int | None = None
    """Instead of ``batch_size``: a token budget per optimizer step (``batch_size = tokens_per_step // seq_len``)."""
    micro_batch_size: int | None = None
    """Rows per forward and backward; gradients accumulate over ``batch_size / micro_batch_size`` of them.
    Left out: the whole step on the CPU; on a GPU the largest that ``dsft plan``'s memory model fits on the card."""
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    @property
    def kind_spec(self) -> StageKind:
        """This stage's entry in the kinds table (raises UsageError for an unknown kind)."""
        return stage_kind(self.kind)

    @property
    def esft_settings(self) -> EsftSettings:
        return self.esft or EsftSettings()

    @property
    def distill_settings(self) -> DistillSettings:
        return self.distill or DistillSettings()

    @property
    def mixtures(self) -> tuple[Phase, ...]:
        """The stage's data as phases (one phase named after the stage when it has a single mixture)."""
        return self.phases or (Phase(name=self.name, fraction=1.0, data=self.data),)

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if not self.lr > 0:
            problems.append(("lr", f"must be > 0, got {self.lr}"))
        if (self.steps is None) == (self.epochs is None):
            problems.append(("steps", "give either steps or epochs (exactly one)"))
        if self.steps is not None and self.steps <= 0:
            problems.append(("steps", f"must be > 0, got {self.steps}"))
        if self.epochs is not None and not (math.isfinite(self.epochs) and self.epochs > 0):
            problems.append(("epochs", f"must be a number > 0, got {self.epochs}"))
        for name in ("batch_size", "tokens_per_step", "micro_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                problems.append((name, f"must be > 0, got {getattr(self, name)}"))
        if self.batch_size is not None and self.tokens_per_step is not None:
            problems.append(("tokens_per_step", "give either batch_size or tokens_per_step, not both"))
        if self.seq_len is not None and self.seq_len < 16:
            problems.append(("seq_len", f"must be >= 16, got {self.seq_len}"))
        if self.tokens_per_step is not None and self.seq_len is not None and self.tokens_per_step < self.seq_len:
            problems.append(("tokens_per_step", f"must be at least one row (seq_len {self.seq_len}), got {self.tokens_per_step}"))
        if None not in (self.micro_batch_size, self.batch_size) and self.micro_batch_size > self.batch_size:
            problems.append(("micro_batch_size", f"must be <= batch_size ({self.batch_size}), got {self.micro_batch_size}"))
        if not 0 <= self.warmup_steps < (self.steps or math.inf):
            problems.append(("warmup_steps", f"must be in [0, steps), got {self.warmup_steps}"))
        if not 0 <= self.replay < 1:
            problems.append(("replay", f"must be in [0, 1), got {self.replay}"))
        if self.data and self.phases:
            problems.append(("phases", "give either data or phases, not both"))
        elif not self.data and not self.phases:
            problems.append(("data", "must list at least one source (or give phases)"))
        if self.phases:
            total = sum(p.fraction for p in self.phases)
            if abs(total - 1) > FRACTION_TOLERANCE:
                problems.append(("phases", f"fractions must sum to 1, got {round(total, 6)}"))
            names = [p.name for p in self.phases]
            if len(set(names)) != len(names):
                problems.append(("phases", f"phase names must be unique, got {names}"))
        kind = KINDS.get(self.kind)
        if kind is None:
            problems.append(("kind", unknown_kind(self.kind)))
        else:
            problems += kind.problems(self)
        if (kind is None or kind.trains == "lora") and not self.train.lora and not self.train.terms:
            problems.append(("train", "the stage trains nothing; set train.lora groups or train.terms: true"))
        for other in KINDS.values():  # a kind's settings field belongs to that kind alone
            if other.settings is not None and other.name != self.kind and getattr(self, other.name) is not None:
                problems.append((other.name, f"only for kind {other.name}; this stage is {self.kind}"))
        return problems


@dataclass(frozen=True, kw_only=True)
class AdapterSettings:
    r: int = 16
    alpha: int = 32
    terms: bool = True
    """Extend the vocabulary with the domain's multi-piece terms."""

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.r <= 0:
            problems.append(("r", f"must be > 0, got {self.r}"))
        if self.alpha <= 0:
            problems.append(("alpha", f"must be > 0, got {self.alpha}"))
        return problems


@dataclass(frozen=True, kw_only=True)
class Recipe:
    name: str
    description: str
    stages: tuple[Stage, ...]
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    seed: int = 0
    quantize: Literal["none", "nf4"] = "none"
    """nf4: hold the frozen base in 4-bit NF4 while LoRA trains in bf16 (QLoRA; needs bitsandbytes)."""
    eval_every: int = 0
    """Measure the held-out sets every this many steps inside each stage as well as at its end (0: at stage ends
    only). The losses go to the progress output, the trackers and the training log's step records."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """Every stage's optimizer. adamw: torch's AdamW (two moments a trained value, fp32 for LoRA factors and term
    rows: 8 bytes). adamw8bit: bitsandbytes' blockwise 8-bit AdamW (the moments in 8 bits: 2 bytes a value; tensors
    under 4,096 values keep 32-bit moments) for less memory, at the cost of the moments' rounding."""

    def check(self) -> list[tuple[str, str]]:
        names = [s.name for s in self.stages]
        problems = []
        if self.eval_every < 0:
            problems.append(("eval_every", f"must be >= 0 (0: held-out losses at stage ends only), got {self.eval_every}"))
        if self.quantize == "nf4" and self.uses_esft:
            problems.append(("quantize", "esft trains expert weights, which cannot be 4-bit; use quantize: none"))
        if not self.stages:
            problems.append(("stages", "must list at least one stage"))
        if len(set(names)) != len(names):
            problems.append(("stages", f"stage names must be unique, got {names}"))
        if self.uses_esft and any(s.train.lora for s in self.stages):
            # One adapter holds either PEFT LoRA factors or expert slices; mixing them would need both formats at once.
            bad = next(i for i, s in enumerate(self.stages) if s.train.lora)
            problems.append((f"stages[{bad}].train.lora", "a recipe with an esft stage cannot also train LoRA; set train.lora: [] "
                                                         "(other stages may still train terms)"))
        return problems

    @property
    def uses_esft(self) -> bool:
        """Some stage trains routed experts (ESFT): the adapter holds expert slices, not PEFT LoRA."""
        return any(KINDS[s.kind].trains == "experts" for s in self.stages if s.kind in KINDS)

    @property
    def lora_groups(self) -> tuple[str, ...]:
        """Every LoRA group some stage trains, in table order."""
        used = {g for s in self.stages for g in s.train.lora}
        return tuple(g for g in LORA_GROUPS if g in used)

    def to_data(self) -> dict[str, Any]:
        return to_data(self)


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_dir():
        if not path.exists():
            raise NotFoundError(f"recipe file {path} does not exist; check the path")
        return path
    if name_or_path not in builtin_recipes():
        raise NotFoundError(f"unknown recipe {show(name_or_path)}; built-in recipes: {', '.join(builtin_recipes())} (or give a .yaml file)")
    return BUILTIN_DIR / f"{name_or_path}.yaml"


def read_yaml(path: Path) -> Any:
    """The recipe file's data: a UTF-8 regular file, parsed with bounded alias expansion (:mod:`dsft.safe_yaml`)."""
    return safe_yaml.load_file(path, "recipe")


def load_recipe(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load, override (``stages.0.lr=2e-5``) and validate a recipe.

    Raises:
        NotFoundError: unknown recipe name or missing file.
        UsageError: malformed YAML, a bad override, or every schema problem at once (ConfigError).
    """
    path = recipe_path(name_or_path)
    data = read_yaml(path)
    for item in overrides:
        if not isinstance(data, dict):
            break
        apply_override(data, item)
    return load_tree(Recipe, data, str(path) if path.parent != BUILTIN_DIR else f"recipe {path.stem}")


def recipe_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.to_data(), sort_keys=False)
