"""A recipe: a YAML file of stages, loaded into a frozen dataclass tree and validated before any work."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dsft.errors import NotFoundError, UsageError
from dsft.recipes.typed import apply_override, load_tree, to_data

BUILTIN_DIR = Path(__file__).parent / "builtin"
DATA_SOURCES = ("domain.raw", "domain.instruct", "domain.longtail", "general.raw", "user")
"""Named sources; ``user`` is the files given with ``--data``; ``file:PATH`` names a file directly."""


@dataclass(frozen=True)
class DataSource:
    source: str
    """One of domain.raw, domain.instruct, domain.longtail, general.raw, user, or file:PATH."""
    weight: float = 1.0

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.source not in DATA_SOURCES and not self.source.startswith("file:"):
            problems.append(("source", f"must be one of {', '.join(DATA_SOURCES)} or file:PATH, got {self.source!r}"))
        if self.weight <= 0:
            problems.append(("weight", f"must be > 0, got {self.weight}"))
        return problems


@dataclass(frozen=True)
class Trainable:
    """What a stage trains."""

    lora: tuple[str, ...] = ("attention", "shared_experts", "routed_experts")
    """LoRA target groups: attention, shared_experts, routed_experts (empty: no LoRA)."""
    top_layers: float = 1.0
    """Fraction of decoder layers, counted from the top, that get LoRA (1.0 = all)."""
    terms: bool = True
    """Train the term-embedding rows of the domain's new tokens."""

    def check(self) -> list[tuple[str, str]]:
        problems = []
        bad = [t for t in self.lora if t not in ("attention", "shared_experts", "routed_experts")]
        if bad:
            problems.append(("lora", f"unknown group {bad[0]!r}; choose from attention, shared_experts, routed_experts"))
        if not 0 < self.top_layers <= 1:
            problems.append(("top_layers", f"must be in (0, 1], got {self.top_layers}"))
        if not self.lora and not self.terms:
            problems.append(("", "the stage trains nothing; set lora groups or terms: true"))
        return problems


@dataclass(frozen=True)
class Stage:
    name: str
    kind: Literal["cpt", "sft"]
    """cpt: continued pre-training on raw text; sft: instruction tuning (loss on responses)."""
    data: tuple[DataSource, ...]
    lr: float
    steps: int
    train: Trainable = field(default_factory=Trainable)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    batch_size: int = 8
    seq_len: int = 256
    weight_decay: float = 0.0
    grad_clip: float = 1.0

    def check(self) -> list[tuple[str, str]]:
        problems = []
        if self.lr <= 0:
            problems.append(("lr", f"must be > 0, got {self.lr}"))
        if self.steps <= 0:
            problems.append(("steps", f"must be > 0, got {self.steps}"))
        if self.batch_size <= 0:
            problems.append(("batch_size", f"must be > 0, got {self.batch_size}"))
        if self.seq_len < 16:
            problems.append(("seq_len", f"must be >= 16, got {self.seq_len}"))
        if not 0 <= self.warmup_steps < self.steps:
            problems.append(("warmup_steps", f"must be in [0, steps), got {self.warmup_steps}"))
        if not self.data:
            problems.append(("data", "must list at least one source"))
        return problems


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    stages: tuple[Stage, ...]
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    seed: int = 0

    def check(self) -> list[tuple[str, str]]:
        names = [s.name for s in self.stages]
        problems = []
        if not self.stages:
            problems.append(("stages", "must list at least one stage"))
        if len(set(names)) != len(names):
            problems.append(("stages", f"stage names must be unique, got {names}"))
        return problems

    def to_data(self) -> dict[str, Any]:
        return to_data(self)


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.exists():
            raise NotFoundError(f"recipe file {path} does not exist; check the path")
        return path
    if name_or_path not in builtin_recipes():
        raise NotFoundError(f"unknown recipe {name_or_path!r}; built-in recipes: {', '.join(builtin_recipes())} (or give a .yaml file)")
    return BUILTIN_DIR / f"{name_or_path}.yaml"


def read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise UsageError(f"{path}: malformed YAML at {where}: {exc.problem}") from None


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
