"""Live run tracking through accelerate's trackers (TensorBoard, MLflow, Weights & Biases).

``dsft train --report-to tensorboard`` (the default) writes TensorBoard events into the run directory
while training: every step's loss, learning rate, tokens/s, router aux loss, load imbalance and gradient
norm, each stage's held-out losses, the resolved recipe as the run's parameters, and the adapter's ref
once it is registered. The adapter directory keeps its own copy of the step log (:mod:`dsft.eval.logs`).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dsft.errors import UsageError

TRACKERS = ("tensorboard", "mlflow", "wandb")
CHOICES = (*TRACKERS, "all", "none")
_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}


def parse_report_to(value: str) -> tuple[str, ...]:
    """``tensorboard``, ``mlflow,wandb``, ``all`` (every installed tracker) or ``none`` as tracker names.

    Raises:
        UsageError: an unknown name, or a tracker whose package is not installed (with the pip line).
    """
    names = [v.strip().lower() for v in value.split(",") if v.strip()] or ["none"]
    unknown = [n for n in names if n not in CHOICES]
    if unknown:
        raise UsageError(f"--report-to: unknown tracker {unknown[0]!r}; choose from {', '.join(CHOICES)} (comma-separated)")
    if "none" in names:
        return ()
    if "all" in names:
        return tuple(t for t in TRACKERS if importlib.util.find_spec(_PACKAGES[t]) is not None)
    for n in names:
        if importlib.util.find_spec(_PACKAGES[n]) is None:
            raise UsageError(f"--report-to {n}: the {_PACKAGES[n]} package is not installed; pip install {_PACKAGES[n]}")
    return tuple(dict.fromkeys(names))


def flat_params(tree: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """A nested recipe as ``{"stages.0.lr": 0.0002, ...}`` (lists of scalars and None as text): what trackers take."""
    if isinstance(tree, Mapping):
        out: dict[str, bool | int | float | str] = {}
        for k, v in tree.items():
            out.update(flat_params(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in tree):
        out = {}
        for i, v in enumerate(tree):
            out.update(flat_params(v, f"{prefix}{i}."))
        return out
    key = prefix.rstrip(".")
    return {key: tree if isinstance(tree, (bool, int, float, str)) else str(tree)}


class RunTracker:
    """Forwards a training run's events (:class:`dsft.recipes.runner.Events`) to accelerate trackers, live.

    Steps count across stages (stage 2's first step follows stage 1's last), so curves of a multi-stage
    run join up.
    """

    def __init__(self, names: Sequence[str], run_name: str, logging_dir: Path, params: Mapping[str, Any]):
        from accelerate import PartialState, tracking

        PartialState()  # accelerate's trackers log through its logger, which wants its state (one process: no-op)
        made = {"tensorboard": lambda: tracking.TensorBoardTracker(run_name, logging_dir),
                "mlflow": lambda: tracking.MLflowTracker(experiment_name="dsft", logging_dir=str(logging_dir), run_name=run_name),
                "wandb": lambda: tracking.WandBTracker(run_name, project="dsft")}
        self.trackers = [made[n]() for n in names]
        for t in self.trackers:
            t.main_process_only = False  # only the main rank makes a RunTracker; no accelerate state needed
            t.start()
            t.store_init_configuration(flat_params(params))
        self.offset = 0
        self.step = 0

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "stage_start":
            self.offset = self.step - payload.get("start_step", 0)
        elif kind == "step":
            i = payload["info"]
            self.step = self.offset + i.step
            values = {"train/loss": i.loss, "train/lr": i.lr, "train/tokens_per_s": i.tokens_per_s,
                      "train/aux_loss": i.aux_loss, "train/imbalance": i.imbalance}
            if i.grad_norm is not None:
                values["train/grad_norm"] = i.grad_norm
            self.log(values)
        elif kind in ("stage_eval", "eval"):
            self.log({f"eval/{k}": v for k, v in payload.items() if k.endswith(("_loss", "_ppl")) and isinstance(v, (int, float))})

    def log(self, values: dict[str, float | str]) -> None:
        for t in self.trackers:
            t.log(values, step=self.step)

    def finish(self, adapter: str | None = None) -> None:
        """Record the registered adapter's ref (when there is one) and close every tracker."""
        for t in self.trackers:
            if adapter is not None:
                if t.name == "mlflow":
                    import mlflow

                    mlflow.set_tag("dsft.adapter", adapter)
                else:
                    t.log({"adapter": adapter}, step=self.step)
            t.finish()
        self.trackers = []
