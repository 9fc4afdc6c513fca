"""``dsft eval --lm-eval TASKS``: lm-evaluation-harness tasks on a base alone and with an adapter, side by side.

The base is loaded once into a :class:`dsft.runtime.RuntimeBase`, the adapter attached to it with the
runtime's checks, and both are scored through the registered ``dsft`` lm-eval model
(:mod:`dsft.lmeval.model`). The figures are recorded in the registry beside the held-out ones of
``dsft eval`` (verified metrics of the adapter on that base), under ``lm_eval:<task>:<metric>`` keys.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsft.errors import UsageError

METRIC_PREFIX = "lm_eval"
"""Registry metric keys: ``lm_eval:<task>:<metric>`` (with the adapter), ``...:base``, ``...:delta``."""


def import_lm_eval() -> Any:
    """lm-eval, or a one-line UsageError naming the extra that installs it."""
    from dsft.extras import require

    return require("lmeval", "lm-evaluation-harness scoring")[0]


def task_manager(tasks: Sequence[str], include: Sequence[str | Path] = ()) -> Any:
    """An lm-eval TaskManager that knows every task in ``tasks``.

    Indexing lm-eval's own ~15k task configs takes seconds, so when the tasks are all in ``include``
    only those directories are indexed.

    Raises:
        UsageError: a task (or group) lm-eval does not know; the message names it and how to list tasks.
    """
    import_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in include]
    for p in paths:
        if not Path(p).is_dir():
            raise UsageError(f"--lm-eval-include {p}: no such directory")
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=paths or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor in {', '.join(paths)})" if paths else ""
        raise UsageError(f"lm-eval does not know the task{'s' * (len(unknown) > 1)} {', '.join(unknown)}{where}; "
                         "list them with `lm-eval ls tasks` (add --include_path DIR for your own YAML tasks)")
    return manager


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """``"a,b"`` or ``["a", "b,c"]`` -> ``["a", "b", "c"]``."""
    items = [spec] if isinstance(spec, str) else list(spec)
    tasks = [t.strip() for item in items for t in item.split(",") if t.strip()]
    if not tasks:
        raise UsageError("--lm-eval needs at least one task name, e.g. --lm-eval hellaswag,arc_easy")
    return tasks


def _figures(results: dict[str, Any]) -> dict[tuple[str, str], tuple[float, float | None, bool | None]]:
    """``(task, metric) -> (value, stderr, higher is better)`` from lm-eval's results (``acc,none`` keys)."""
    out = {}
    for task, metrics in results["results"].items():
        better = results.get("higher_is_better", {}).get(task, {})
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if not filt or "_stderr" in metric or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name = metric if filt == "none" else f"{metric} ({filt})"
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            out[(task, name)] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None,
                                 better.get(metric))
    return out


def run_lm_eval(ref: str, tasks: str | Sequence[str], *, base: str | None = None, registry: str | None = None,
                device: str | None = None, include: Sequence[str | Path] = (), limit: int | float | None = None,
                batch_size: int = 8, num_fewshot: int | None = None, record: bool = True) -> dict[str, Any]:
    """Run lm-eval ``tasks`` on the base alone and on base + ``ref``; record the adapter's figures.

    Args:
        ref: adapter ref (``finance``, ``finance@0.1.0``, ``finance@production``).
        tasks: task or group names lm-eval knows (``"a,b"`` or a list), from its own set or ``include``.
        base: the base to score on (default: the one the adapter records it was trained on).
        include: directories of task YAMLs of your own (lm-eval's ``--include_path``).
        limit: documents per task (an int) or a fraction of them (a float below 1), for a quick look.
    Returns:
        ``{"adapter", "base", "tasks", "rows": [{"task", "metric", "base", "adapter", "delta", "base_stderr",
        "adapter_stderr", "higher_is_better"}], "lm_eval_version", "limit"}``.
    Raises:
        UsageError: lm-eval missing, an unknown task, no base to score on.
        NotFoundError, IntegrityError, IncompatibleError: the adapter cannot be attached to the base.
    """
    lm_eval = import_lm_eval()
    names = parse_tasks(tasks)
    manager = task_manager(names, include)  # before the model loads: a typo costs no minutes
    from lm_eval import simple_evaluate

    from dsft.lmeval.model import DsftLM
    from dsft.registry import open_registry
    from dsft.runtime import load_base

    with open_registry(registry) as reg:
        rec = reg.resolve(ref, verify_files=False)  # the attach below checks every file against its sha256
    manifest = rec.parsed_manifest()
    if base is None and manifest.base is None:
        raise UsageError(f"{rec.ref} does not record the base it was trained on; pass --base")
    runtime = load_base(base or manifest.base.name, device=device, registry=registry)
    try:
        scored = {}
        for label, adapter in (("base", None), ("adapter", rec.ref)):
            lm = DsftLM(runtime=runtime, adapter=adapter, batch_size=batch_size)
            res = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                                  log_samples=False, bootstrap_iters=1000)
            scored[label] = _figures(res)
        fingerprint, base_name, base_source = runtime.fingerprint, runtime.ref.name, runtime.ref.source
    finally:
        runtime.close()
    rows = []
    for key, (value, stderr, better) in scored["adapter"].items():
        b = scored["base"].get(key)
        rows.append({"task": key[0], "metric": key[1], "base": b[0] if b else None, "adapter": value,
                     "delta": value - b[0] if b else None, "base_stderr": b[1] if b else None,
                     "adapter_stderr": stderr, "higher_is_better": better})
    out = {"adapter": rec.ref, "base": base_name, "tasks": names, "rows": rows,
           "lm_eval_version": lm_eval.__version__, "limit": limit}
    if record:
        flat: dict[str, Any] = {f"{METRIC_PREFIX}_version": lm_eval.__version__}
        if limit is not None:
            flat[f"{METRIC_PREFIX}_limit"] = limit  # figures from a subset are not comparable with full runs
        for r in rows:
            key = f"{METRIC_PREFIX}:{r['task']}:{r['metric']}"
            flat.update({key: r["adapter"], f"{key}:base": r["base"], f"{key}:delta": r["delta"]})
        with open_registry(registry) as reg:
            # merge: the held-out figures of `dsft eval` on this base stay beside these
            reg.record_eval(rec.ref, base_fingerprint=fingerprint, metrics=flat, name=base_name, source=base_source,
                            merge=True)
    return out
