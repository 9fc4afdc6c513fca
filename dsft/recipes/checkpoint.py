"""Run directories and checkpoints: what ``dsft train --resume`` continues from.

Every training run gets ``$DSFT_HOME/runs/<domain>-<time>-<id>/``::

    run.json                    what the run is (domain, recipe + its hash, base fingerprint, seed, step cap,
                                data files + sha256) and its status: running | done
    recipe.yaml                 the resolved recipe
    stages/<i>-<name>/stage.json  each finished stage's metrics (loss, held-out losses, mixture, ...)
    checkpoints/latest.json     {"dir": ..., "files": {name: sha256}}: the one checkpoint to resume from
    checkpoints/s<i>-<step>/    tensors.safetensors (adapter state "adapter/...", optimizer state "optim/...",
                                RNG "rng/...") + state.json (a :class:`CheckpointState`: stage, step, losses,
                                metrics so far, ...)

A checkpoint is written to a temporary directory, renamed into place, and only then named by
``latest.json`` (itself replaced atomically), so a crash at any moment leaves the previous
checkpoint intact. Weights and optimizer state are safetensors; scalars are JSON; nothing is pickled.
When the run finishes, its checkpoints are removed (the adapter holds the result).

``state.json`` carries its own ``schema_version`` (:data:`STATE_VERSION`); an older one is brought up
to date by the named functions of :data:`STATE_UPGRADES`, one version at a time, so a run started by
an older dsft can still be resumed.
"""
from __future__ import annotations

import json
import logging
import os
import random
import secrets
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.adapters.esft import EsftState
from dsft.atomic import fsync_dir, sha256_file, sha256_json, staging_dir, write_json_atomic, write_text_atomic
from dsft.errors import IntegrityError, NotFoundError, UsageError
from dsft.home import dsft_home

RUN_FILE = "run.json"
STAGE_FILE = "stage.json"
LATEST = "latest.json"
TENSORS = "tensors.safetensors"
STATE = "state.json"
SCHEMA_VERSION = 1
"""Of ``run.json``."""
STATE_VERSION = 2
"""Of a checkpoint's ``state.json``: 2 since the state became :class:`CheckpointState`."""

log = logging.getLogger(__name__)


def runs_dir() -> Path:
    return dsft_home() / "runs"


@dataclass(frozen=True)
class RunKey:
    """What must be equal for a checkpoint to be resumed: the same recipe on the same base with the same data."""

    domain: str
    recipe: str
    recipe_sha256: str
    base: str
    base_fingerprint: str
    seed: int
    max_steps: int | None
    data: tuple[tuple[str, str], ...]
    """(path, sha256) of each ``--data`` file (a directory: the sha256 of its files' hashes)."""

    def to_json(self) -> dict[str, Any]:
        return {"domain": self.domain, "recipe": self.recipe, "recipe_sha256": self.recipe_sha256, "base": self.base,
                "base_fingerprint": self.base_fingerprint, "seed": self.seed, "max_steps": self.max_steps,
                "data": [list(d) for d in self.data]}

    @staticmethod
    def build(domain: str, recipe_data: dict[str, Any], base: str, fingerprint_id: str, seed: int,
              max_steps: int | None, data_files: list[Path]) -> RunKey:
        return RunKey(domain, recipe_data["name"], sha256_json(recipe_data), base, fingerprint_id, seed, max_steps,
                      tuple((str(getattr(p, "location", p)), p.fingerprint() if hasattr(p, "fingerprint") else _hash_path(p))
                            for p in data_files))

    def mismatch(self, saved: dict[str, Any]) -> str | None:
        """Why a run with key ``saved`` cannot be resumed by this command (None: it can)."""
        if saved.get("recipe") != self.recipe:
            return f"it ran recipe {saved.get('recipe')!r}, not {self.recipe!r}; resume with --recipe {saved.get('recipe')}"
        if saved.get("recipe_sha256") != self.recipe_sha256:
            return f"its recipe {self.recipe!r} had other settings (overrides or a changed file); give the same recipe and overrides"
        if saved.get("base_fingerprint") != self.base_fingerprint:
            return f"it trained base {saved.get('base')!r} ({str(saved.get('base_fingerprint'))[:12]}), not {self.base!r} " \
                   f"({self.base_fingerprint[:12]}); resume with --base {saved.get('base')}"
        if saved.get("seed") != self.seed:
            return f"it ran with seed {saved.get('seed')}, not {self.seed}; resume with --seed {saved.get('seed')}"
        if saved.get("max_steps") != self.max_steps:
            return f"it ran with --max-steps {saved.get('max_steps')}, not {self.max_steps}"
        if [list(d) for d in self.data] != saved.get("data"):
            return "its --data files differ from these (names or contents)"
        return None


def _hash_path(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        return sha256_json({str(p.relative_to(path)): sha256_file(p) for p in sorted(path.rglob("*")) if p.is_file()})
    return sha256_file(path)


@dataclass(frozen=True)
class CheckpointState:
    """Where a run stands at a checkpoint: what ``state.json`` holds beside the checkpoint's tensors."""

    stage: int
    """Index of the stage to run next (the stages before it are finished)."""
    step: int
    """Steps of that stage already done (0: it starts from its beginning)."""
    losses: tuple[float, ...]
    """The training loss of each of those steps."""
    before: dict[str, float]
    """Held-out losses of the base before training (the run's "before" figures)."""
    stage_metrics: tuple[dict[str, Any], ...]
    """Metrics of the finished stages, in order."""
    log: tuple[dict[str, Any], ...]
    """Per-step training log so far (what the adapter's training log will hold)."""
    trained: dict[str, int]
    """Elements trained so far by key (see :class:`dsft.recipes.stages.StageContext`)."""
    esft: EsftState | None
    """The ESFT selection of the run so far (None: no ESFT stage has run)."""
    selection: dict[int, tuple[int, ...]] | None
    """The current ESFT stage's own selection (None: not inside an ESFT stage)."""
    elapsed: float
    """Wall seconds trained so far, over every process that ran this run."""
    python_rng: list[Any] | None = field(default=None, repr=False)
    """Python's ``random`` state (torch's RNG state is a tensor of the checkpoint)."""

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": STATE_VERSION, "stage": self.stage, "step": self.step, "losses": list(self.losses),
                "before": self.before, "stage_metrics": list(self.stage_metrics), "log": list(self.log),
                "trained": self.trained, "esft": self.esft.to_json() if self.esft else None,
                "selection": {str(k): list(v) for k, v in self.selection.items()} if self.selection is not None else None,
                "elapsed": self.elapsed, "python_rng": self.python_rng}

    @staticmethod
    def from_json(data: dict[str, Any], where: str = "checkpoint") -> CheckpointState:
        """Read a ``state.json`` of this or an older version (upgraded by :data:`STATE_UPGRADES`).

        Raises:
            IntegrityError: written by a newer dsft, or a required key is missing.
        """
        version = data.get("schema_version", 1)
        if version > STATE_VERSION:
            raise IntegrityError(f"{where} was written by a newer dsft (state version {version}); upgrade dsft to resume it")
        while version < STATE_VERSION:
            data = STATE_UPGRADES[version](data)
            version = data["schema_version"]
        known = {"schema_version", *CheckpointState.__dataclass_fields__}
        missing = sorted(k for k in known - {"python_rng"} if k not in data)
        if missing:
            raise IntegrityError(f"{where} lacks {', '.join(missing)}; it cannot be resumed (start again without --resume)")
        extra = sorted(set(data) - known)
        if extra:
            log.warning("%s: ignoring unknown keys %s", where, ", ".join(extra))
        sel = data["selection"]
        return CheckpointState(
            stage=int(data["stage"]), step=int(data["step"]), losses=tuple(float(x) for x in data["losses"]),
            before=dict(data["before"]), stage_metrics=tuple(data["stage_metrics"]), log=tuple(data["log"]),
            trained=dict(data["trained"]), esft=EsftState.from_json(data["esft"]) if data["esft"] else None,
            selection={int(k): tuple(v) for k, v in sel.items()} if sel is not None else None,
            elapsed=float(data["elapsed"]), python_rng=data.get("python_rng"))


def upgrade_state_v1(data: dict[str, Any]) -> dict[str, Any]:
    """Version 1, the dict the runner built: ``stages`` held the finished stages' metrics and
    ``stage_selection`` the ESFT stage's selection; the oldest lack ``stage_selection`` and ``python_rng``."""
    renamed = {"stages": "stage_metrics", "stage_selection": "selection"}
    out = {renamed.get(k, k): v for k, v in data.items()}
    out.setdefault("selection", None)
    out.setdefault("python_rng", None)
    return {**out, "schema_version": 2}


STATE_UPGRADES = {1: upgrade_state_v1}
"""``{version: function}``: each turns a ``state.json`` of that version into the next version's."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: its ``state`` and its ``tensors`` by prefix (adapter/, optim/, rng/)."""

    state: CheckpointState
    tensors: dict[str, torch.Tensor]

    def group(self, prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) + 1 :]: v for k, v in self.tensors.items() if k.startswith(prefix + "/")}


class RunDir:
    """One run's directory (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def info(self) -> dict[str, Any]:
        return json.loads((self.path / RUN_FILE).read_text())

    @property
    def name(self) -> str:
        return self.path.name

    @staticmethod
    def create(root: Path, key: RunKey, recipe_yaml: str) -> RunDir:
        """A new run directory, with ``run.json`` (status running) and the resolved recipe."""
        name = f"{key.domain}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        final = Path(root) / name
        with staging_dir(final) as tmp:
            write_text_atomic(tmp / "recipe.yaml", recipe_yaml)
            write_json_atomic(tmp / RUN_FILE, {"schema_version": SCHEMA_VERSION, "run": name, "status": "running",
                                               "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **key.to_json(),
                                               "pid": os.getpid(), "host": socket.gethostname()})  # for registry gc
            os.rename(tmp, final)
        fsync_dir(final.parent)
        return RunDir(final)

    @staticmethod
    def for_resume(root: Path, key: RunKey) -> RunDir:
        """The latest unfinished run of ``key.domain`` under ``root``, checked against ``key``.

        Raises:
            NotFoundError: no unfinished run of the domain, or it has no checkpoint yet.
            UsageError: its recipe, base, seed, step cap or data differ from this command's.
        """
        runs = []
        for d in Path(root).glob(f"{key.domain}-*"):
            try:
                info = json.loads((d / RUN_FILE).read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if info.get("domain") == key.domain and info.get("status") == "running":
                runs.append((info.get("created", ""), d.name, d))
        if not runs:
            raise NotFoundError(f"--resume: no unfinished {key.domain} run with a checkpoint in {root}; run without --resume to start one")
        run = RunDir(max(runs)[2])
        why = key.mismatch(run.info)
        if why:
            raise UsageError(f"--resume: the last unfinished {key.domain} run ({run.name}) cannot continue here: {why}")
        if not (run.path / "checkpoints" / LATEST).exists():
            raise NotFoundError(f"--resume: run {run.name} stopped before its first checkpoint; run without --resume to start again")
        return run

    # --- checkpoints --------------------------------------------------------------------------

    def save_checkpoint(self, state: CheckpointState, tensors: dict[str, torch.Tensor]) -> Path:
        """Write a checkpoint atomically and make it the one ``--resume`` uses; older ones are removed."""
        from safetensors.torch import save_file

        root = self.path / "checkpoints"
        final = root / f"s{state.stage:02d}-{state.step:06d}"
        with staging_dir(final) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
            write_json_atomic(tmp / STATE, state.to_json())
            files = {n: sha256_file(tmp / n) for n in (TENSORS, STATE)}
            if final.exists():  # the same position written again (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        fsync_dir(root)  # the rename is durable before latest.json names it
        write_json_atomic(root / LATEST, {"dir": final.name, "files": files})
        for old in root.iterdir():  # older checkpoints, and the leftovers of a write that a kill -9 cut short
            if old.is_dir() and old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self) -> Checkpoint:
        """The checkpoint ``latest.json`` names, verified against its sha256s (an older state upgraded).

        Raises:
            NotFoundError: none yet. IntegrityError: a file is missing or changed, or its state is unreadable.
        """
        from safetensors.torch import load_file

        root = self.path / "checkpoints"
        if not (root / LATEST).exists():
            raise NotFoundError(f"run {self.name} has no checkpoint yet; run without --resume")
        latest = json.loads((root / LATEST).read_text())
        d = root / latest["dir"]
        for name, digest in latest["files"].items():
            if not (d / name).exists() or sha256_file(d / name) != digest:
                raise IntegrityError(f"checkpoint {d / name} is missing or changed; it cannot be resumed (start again without --resume)")
        state = CheckpointState.from_json(json.loads((d / STATE).read_text()), f"checkpoint {d}")
        return Checkpoint(state, load_file(str(d / TENSORS)))

    def write_stage(self, index: int, name: str, metrics: dict[str, Any]) -> None:
        write_json_atomic(self.path / "stages" / f"{index}-{name}" / STAGE_FILE, metrics)

    def finish(self, adapter: str, path: Path) -> None:
        """Mark the run done (it can no longer be resumed) and drop its checkpoints."""
        write_json_atomic(self.path / RUN_FILE, {**self.info, "status": "done", "adapter": adapter, "adapter_path": str(path),
                                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        shutil.rmtree(self.path / "checkpoints", ignore_errors=True)


# --- RNG and optimizer state as tensors + JSON --------------------------------------------------


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def python_rng_state() -> list[Any]:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def restore_rng(tensors: dict[str, torch.Tensor], python_state: list[Any] | None) -> None:
    if "torch" in tensors:
        torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    if python_state:
        random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
