"""Training logs: every step's metrics as ``train_log.jsonl`` and TensorBoard events in the adapter directory.

A record: ``{"stage", "step", "loss", "lr", "tokens_per_s", "aux_loss", "imbalance"}`` (imbalance = the
busiest expert's load over the mean, averaged over MoE layers; 1.0 is perfectly balanced), and on the steps the
recipe's ``eval_every`` measured: ``"heldout": {"<set>_loss": ...}``.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsft.errors import NotFoundError

LOG_FILE = "train_log.jsonl"
TB_DIR = "tensorboard"


def write_training_log(directory: Path, records: Sequence[dict[str, Any]]) -> None:
    """Write the JSONL log and TensorBoard scalars (one global step counter across stages)."""
    from torch.utils.tensorboard import SummaryWriter

    (directory / LOG_FILE).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    writer = SummaryWriter(log_dir=str(directory / TB_DIR))
    try:
        for global_step, r in enumerate(records, start=1):
            for key in ("loss", "lr", "tokens_per_s", "aux_loss", "imbalance"):
                writer.add_scalar(f"train/{key}", r[key], global_step)
            for key, value in r.get("heldout", {}).items():
                writer.add_scalar(f"heldout/{key}", value, global_step)
    finally:
        writer.close()


def read_training_log(directory: Path) -> list[dict[str, Any]]:
    path = Path(directory) / LOG_FILE
    if not path.exists():
        raise NotFoundError(f"{directory} has no {LOG_FILE} (adapters trained before training logs existed have none)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage: steps, first and last loss (mean of up to 5 steps), mean tokens/s, mean imbalance, and with
    ``eval_every`` the held-out losses of each step that measured them (``heldout``: ``[{"step", ...}]``)."""
    out = []
    for stage in dict.fromkeys(r["stage"] for r in records):
        rs = [r for r in records if r["stage"] == stage]
        head, tail = rs[: min(5, len(rs))], rs[-min(5, len(rs)):]
        row = {
            "stage": stage, "steps": len(rs),
            "loss_first": round(sum(r["loss"] for r in head) / len(head), 4),
            "loss_last": round(sum(r["loss"] for r in tail) / len(tail), 4),
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in rs) / len(rs), 1),
            "imbalance": round(sum(r["imbalance"] for r in rs) / len(rs), 3),
        }
        heldout = [{"step": r["step"], **r["heldout"]} for r in rs if r.get("heldout")]
        if heldout:
            row["heldout"] = heldout
        out.append(row)
    return out


def plot_loss(records: Sequence[dict[str, Any]], png: Path, title: str = "") -> Path:
    """The loss curve (one colour per stage) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    step = 0
    heldout: dict[str, list[tuple[int, float]]] = {}  # eval_every's points, at the run's global step
    for stage in dict.fromkeys(r["stage"] for r in records):
        rs = [r for r in records if r["stage"] == stage]
        ax.plot(range(step + 1, step + len(rs) + 1), [r["loss"] for r in rs], label=stage)
        for i, r in enumerate(rs, start=step + 1):
            for key, value in r.get("heldout", {}).items():
                heldout.setdefault(key, []).append((i, value))
        step += len(rs)
    for key, points in heldout.items():
        ax.plot(*zip(*points), marker="o", linestyle="--", label=f"held-out {key.removesuffix('_loss')}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title or "training loss")
    ax.legend()
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
