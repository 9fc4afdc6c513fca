"""Run directories and checkpoints: what ``dsft train --resume`` continues from.

Every training run gets ``$DSFT_HOME/runs/<domain>-<time>-<id>/``::

    run.json                    what the run is (domain, recipe + its hash, base fingerprint, seed, step cap,
                                data files + sha256) and its status: running | done
    recipe.yaml                 the resolved recipe
    stages/<i>-<name>/stage.json  each finished stage's metrics (loss, held-out losses, mixture, ...)
    checkpoints/latest.json     {"dir": ..., "files": {name: sha256}}: the one checkpoint to resume from
    checkpoints/s<i>-<step>/    tensors.safetensors (adapter state "adapter/...", optimizer state "optim/...",
                                RNG "rng/...") + state.json (stage, step, losses, metrics so far, ...)

A checkpoint is written to a temporary directory, renamed into place, and only then named by
``latest.json`` (itself replaced atomically), so a crash at any moment leaves the previous
checkpoint intact. Weights and optimizer state are safetensors; scalars are JSON; nothing is pickled.
When the run finishes, its checkpoints are removed (the adapter holds the result).
"""
from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsft.atomic import sha256_file, sha256_json, staging_dir, write_json_atomic, write_text_atomic
from dsft.errors import IntegrityError, NotFoundError, UsageError
from dsft.home import dsft_home

RUN_FILE = "run.json"
STAGE_FILE = "stage.json"
LATEST = "latest.json"
TENSORS = "tensors.safetensors"
STATE = "state.json"
SCHEMA_VERSION = 1


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


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``state`` (JSON) and ``tensors`` by prefix (adapter/, optim/, rng/)."""

    state: dict[str, Any]
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

    def save_checkpoint(self, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
        """Write a checkpoint atomically and make it the one ``--resume`` uses; older ones are removed."""
        from safetensors.torch import save_file

        root = self.path / "checkpoints"
        final = root / f"s{state['stage']:02d}-{state['step']:06d}"
        with staging_dir(final) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
            write_json_atomic(tmp / STATE, {"schema_version": SCHEMA_VERSION, **state})
            files = {n: sha256_file(tmp / n) for n in (TENSORS, STATE)}
            if final.exists():  # the same position written again (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.rename(tmp, final)
        write_json_atomic(root / LATEST, {"dir": final.name, "files": files})
        for old in root.iterdir():  # older checkpoints, and the leftovers of a write that a kill -9 cut short
            if old.is_dir() and old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def load_checkpoint(self) -> Checkpoint:
        """The checkpoint ``latest.json`` names, verified against its sha256s.

        Raises:
            NotFoundError: none yet. IntegrityError: a file is missing or changed.
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
        state = json.loads((d / STATE).read_text())
        if state.get("schema_version", 1) > SCHEMA_VERSION:
            raise IntegrityError(f"checkpoint {d} was written by a newer dsft; upgrade dsft to resume it")
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
