"""``dsft logs REF``: what a training run logged, as a table, JSON or a loss-curve PNG."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from dsft.cli.common import console, guarded, print_json


@guarded
def logs_command(
    ref: str = typer.Argument(..., help="Adapter ref: finance, finance@0.2.0 or finance@production."),
    plot: Path = typer.Option(None, "--plot", help="Write the loss curve to this PNG file."),
    registry: str = typer.Option(None, "--registry", help="Registry SQLAlchemy URL."),
    json_out: bool = typer.Option(False, "--json", help="Print the per-stage summary and every step as JSON."),
) -> None:
    """Summarise an adapter's training log (loss, tokens/s, expert-load imbalance per stage).

    Example: dsft logs finance@0.1.0 --plot loss.png
    """
    from dsft.eval.logs import plot_loss, read_training_log, summarize
    from dsft.registry import open_registry

    rec = open_registry(registry).resolve(ref)
    records = read_training_log(Path(rec.path))
    summary = summarize(records)
    if plot is not None:
        plot_loss(records, plot, title=f"{rec.ref} training loss")
    if json_out:
        print_json({"adapter": rec.ref, "stages": summary, "steps": records, "plot": str(plot) if plot else None})
        return
    measured = any("heldout" in s for s in summary)  # eval_every's held-out losses inside the stages
    table = Table("stage", "steps", "loss (first 5)", "loss (last 5)", "tokens/s", "expert imbalance",
                  *(["held-out (last inside the stage)"] if measured else []))
    for s in summary:
        last = s.get("heldout", [{}])[-1]
        heldout = ", ".join(f"{k.removesuffix('_loss')} {v:.4f}" for k, v in last.items() if k != "step")
        table.add_row(s["stage"], str(s["steps"]), f"{s['loss_first']:.4f}", f"{s['loss_last']:.4f}",
                      f"{s['tokens_per_s']:,.0f}", f"{s['imbalance']:.2f}",
                      *([f"step {last['step']}: {heldout}" if last else ""] if measured else []))
    console.print(f"[bold]{rec.ref}[/] ({escape(str(rec.path))})")
    console.print(table)
    if plot is not None:
        console.print(f"loss curve written to {escape(str(plot))}")
