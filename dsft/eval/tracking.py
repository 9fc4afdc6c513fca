"""Live run tracking through accelerate's trackers (TensorBoard, MLflow, Weights & Biases).

``dsft train --report-to tensorboard`` (the default) writes TensorBoard events into the run directory
while training: every step's loss, learning rate, tokens/s, router aux loss, load imbalance and gradient
norm, each stage's held-out losses, the resolved recipe as the run's parameters, and the adapter's ref
once it is registered. The adapter directory keeps its own copy of the step log (:mod:`dsft.eval.logs`).

MLflow logs to ``MLFLOW_TRACKING_URI`` when it is set (a tracking server, a database), otherwise to a SQLite
store in ``$DSFT_HOME/mlflow.db`` (MLflow 3 refuses its old ``./mlruns`` file store by default); see it with
``mlflow ui --backend-store-uri sqlite:///$DSFT_HOME/mlflow.db``. A tracking server that does not answer
stops ``dsft train`` before any work, unless ``--report-to-optional`` lets the run go on without it; a
tracker that fails during a run is dropped with a warning (a run is never lost to its metrics).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
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
            raise UsageError(f"--report-to {n}: the {_PACKAGES[n]} package is not installed; pip install 'dsft[tracking]' (or pip install {_PACKAGES[n]})")
    return tuple(dict.fromkeys(names))


def mlflow_tracking_uri() -> str:
    """Where MLflow logs: ``MLFLOW_TRACKING_URI``, else a SQLite store in ``$DSFT_HOME``."""
    from dsft.home import dsft_home

    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{dsft_home() / 'mlflow.db'}"


def unreachable(names: Sequence[str], timeout: float = 5.0) -> dict[str, str]:
    """The trackers among ``names`` whose server does not answer, with why: an MLflow tracking server (an
    ``http(s)`` tracking URI) must answer ``GET /health``. Local stores always count as reachable."""
    out: dict[str, str] = {}
    uri = mlflow_tracking_uri() if "mlflow" in names else ""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:  # noqa: S310 (http(s) only)
                if r.status != 200:
                    out["mlflow"] = f"the MLflow tracking server at {uri} answered /health with HTTP {r.status}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            out["mlflow"] = f"the MLflow tracking server at {uri} does not answer ({reason})"
    return out


def reachable_trackers(names: tuple[str, ...], optional: bool) -> tuple[tuple[str, ...], list[str]]:
    """``names`` less the trackers that cannot be reached, and a warning for each one left out.

    Raises:
        UsageError: one cannot be reached and ``optional`` is False (nothing has started yet).
    """
    down = unreachable(names)
    if down and not optional:
        name, why = next(iter(down.items()))
        raise UsageError(f"--report-to {name}: {why}; start it, set MLFLOW_TRACKING_URI to one that runs, "
                         "or add --report-to-optional to train without it")
    return tuple(n for n in names if n not in down), [f"not tracking to {n}: {why}" for n, why in down.items()]


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
    run join up, and a resumed run goes on from the checkpoint's step.
    """

    def __init__(self, names: Sequence[str], run_name: str, logging_dir: Path, params: Mapping[str, Any],
                 tags: Mapping[str, str] | None = None, on_warning: Callable[[str], None] | None = None):
        from accelerate import PartialState, tracking

        PartialState()  # accelerate's trackers log through its logger, which wants its state (one process: no-op)
        self.on_warning = on_warning or (lambda message: None)
        made = {"tensorboard": lambda: tracking.TensorBoardTracker(run_name, logging_dir),
                "mlflow": lambda: _mlflow_tracker(run_name, tags or {}),
                # accelerate passes its first argument to wandb.init as the project
                "wandb": lambda: tracking.WandBTracker("dsft", name=run_name, tags=list((tags or {}).values()))}
        self.trackers = [made[n]() for n in names]
        for t in self.trackers:
            t.main_process_only = False  # only the main rank makes a RunTracker; no accelerate state needed
        self._each(lambda t: t.start())
        self._each(lambda t: t.store_init_configuration(flat_params(params)))
        self.offset = 0
        self.step = 0

    def _each(self, call: Callable[[Any], None]) -> None:
        """``call`` on every tracker; one that raises is dropped with a warning and the others go on."""
        for t in list(self.trackers):
            try:
                call(t)
            except Exception as exc:  # a tracker's failure (a server gone) must not stop training
                self.trackers.remove(t)
                self.on_warning(f"stopped tracking to {t.name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        if kind == "resume":  # a resumed run's curves continue where the checkpoint left them
            self.step = payload.get("steps_done", 0)
        elif kind == "stage_start":
            self.offset = self.step - payload.get("start_step", 0)
        elif kind == "step":
            i = payload["info"]
            self.step = self.offset + i.step
            values = {"train/loss": i.loss, "train/lr": i.lr, "train/tokens_per_s": i.tokens_per_s,
                      "train/aux_loss": i.aux_loss, "train/imbalance": i.imbalance}
            if i.grad_norm is not None:
                values["train/grad_norm"] = i.grad_norm
            self.log(values)
        elif kind == "step_eval":  # at the step it followed (its step event came first)
            self.log(_figures(payload, "heldout/"))
        elif kind == "stage_eval":
            self.log(_figures(payload, "eval/"))
        elif kind == "eval" and payload.get("when") == "after":  # beside eval/*_before (the last stage's eval/* has it too)
            self.log(_figures(payload, "eval/", "_after"))

    def log(self, values: dict[str, float | str]) -> None:
        self._each(lambda t: t.log(values, step=self.step))

    def finish(self, adapter: str | None = None) -> None:
        """Record the registered adapter's ref (when there is one) and close every tracker."""
        if adapter is not None:
            self._each(lambda t: _tag(t, "dsft.adapter", adapter, self.step))
        self._each(lambda t: t.finish())
        self.trackers = []


def _figures(payload: Mapping[str, Any], prefix: str, suffix: str = "") -> dict[str, float | str]:
    """An evaluation event's losses and perplexities as tracker values ``<prefix><name><suffix>``."""
    return {f"{prefix}{k}{suffix}": v for k, v in payload.items() if k.endswith(("_loss", "_ppl")) and isinstance(v, (int, float))}


def _mlflow_tracker(run_name: str, tags: Mapping[str, str]) -> Any:
    import mlflow
    from accelerate import tracking

    for name in ("mlflow", "alembic"):  # MLflow's store set-up logs each migration at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    mlflow.set_tracking_uri(mlflow_tracking_uri())
    # No logging_dir: accelerate would make it the experiment's artifact location, shared by every later run.
    return tracking.MLflowTracker(experiment_name="dsft", run_name=run_name, tags=dict(tags))


def _tag(tracker: Any, key: str, value: str, step: int) -> None:
    if tracker.name == "mlflow":
        import mlflow

        mlflow.set_tag(key, value)
    else:
        tracker.log({key: value}, step=step)
