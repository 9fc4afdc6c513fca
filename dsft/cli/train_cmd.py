"""``dsft train``: a thin wrapper over :func:`dsft.train` with a live progress bar."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dsft.base.presets import DEFAULT_BASE
from dsft.cli.common import console, err_console, guarded, print_json


class _ProgressView:
    """Renders training events: one bar per stage with step, loss, tokens/s and ETA."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task = None

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        out = err_console
        if kind == "base" and not self.quiet:
            out.print(f"base [bold]{payload['name']}[/] ({payload['architecture']}) on {payload['device']}")
        elif kind == "eval" and not self.quiet:
            self._close()
            out.print(f"held-out {payload['when']}: domain loss {payload['domain_loss']:.4f} (ppl {payload['domain_ppl']:.2f}), "
                      f"general loss {payload['general_loss']:.4f}")
        elif kind == "resume" and not self.quiet:
            out.print(f"resuming run {payload['run']} at stage {payload['stage']}, step {payload['step']}")
        elif kind == "teacher" and not self.quiet:
            out.print(f"stage [bold]{payload['stage']}[/]: teacher {payload['teacher']}")
        elif kind == "stage_eval" and not self.quiet:
            self._close()
            out.print(f"after stage {payload['stage']}: held-out domain loss {payload['domain_loss']:.4f}, general loss {payload['general_loss']:.4f}")
        elif kind == "stage_start":
            self._close()
            if not self.quiet:
                experts = f", experts {payload['experts']}" if payload.get("experts") else ""
                start = f" (from step {payload['start_step']})" if payload.get("start_step") else ""
                out.print(f"stage [bold]{payload['stage']}[/] ({payload['kind']}): {payload['steps']} steps{start}, "
                          f"{payload['trainable']:,} trainable parameters{experts}, mixture {payload['realised_mixture']}")
            self.progress = Progress(
                TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=out, disable=self.quiet,
            )
            self.progress.start()
            self.task = self.progress.add_task(payload["stage"], total=payload["steps"], completed=payload.get("start_step", 0),
                                               loss=0.0, tps=0.0)
        elif kind == "step" and self.progress is not None:
            info = payload["info"]
            self.progress.update(self.task, completed=info.step, loss=info.loss, tps=info.tokens_per_s)
        elif kind == "saved":
            self._close()

    def _close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


@guarded
def train_command(
    overrides: list[str] = typer.Argument(None, help="Recipe overrides in dotted form, e.g. stages.0.lr=2e-5", show_default=False),
    domain: str = typer.Option("finance", "--domain", "-d", help="Domain name (finance, legal, medical, or one of yours) or a domain YAML file."),
    base: str = typer.Option(DEFAULT_BASE, "--base", "-b", help="Preset name, local model directory or hub id."),
    recipe: str = typer.Option(None, "--recipe", "-r", help="Built-in recipe name or YAML file (default: the domain's)."),
    data: list[Path] = typer.Option(None, "--data", help="Extra data: JSONL, CSV, Parquet, text, or a datasets save_to_disk dir. Repeatable."),
    seed: int = typer.Option(None, "--seed", help="Random seed (default: the recipe's); same seed, same adapter."),
    max_steps: int = typer.Option(None, "--max-steps", help="Cap every stage at this many steps."),
    output: Path = typer.Option(None, "--output", "-o", help="Also copy the finished adapter here."),
    registry: str = typer.Option(None, "--registry", help="Registry SQLAlchemy URL (default $DSFT_REGISTRY_URL or $DSFT_HOME/registry.db)."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code shipped with the base to run."),
    compile_layers: bool = typer.Option(True, "--compile/--no-compile", help="On a GPU, torch.compile each decoder layer."),
    resume: bool = typer.Option(False, "--resume", help="Continue the last unfinished run of this domain from its last checkpoint "
                                "(same recipe, overrides, base, seed, --max-steps and --data)."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Checkpoint every N steps inside a stage (0: at stage ends only)."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
) -> None:
    """Train a domain adapter and register it.

    Example: dsft train --domain finance --recipe two-stage stages.1.lr=2e-3
    """
    from dsft.recipes.runner import train

    view = _ProgressView(quiet or json_out)
    try:
        result = train(domain=domain, base=base, recipe=recipe, data=data or (), overrides=overrides or (), seed=seed,
                       max_steps=max_steps, output=output, registry=registry, device=device,
                       trust_remote_code=trust_remote_code, compile_layers=compile_layers, on_event=view,
                       resume=resume, checkpoint_every=checkpoint_every)
    finally:
        view._close()
    if json_out:
        print_json(result.to_json())
        return
    m = result.metrics
    console.print(f"[bold green]{result.adapter}[/] saved to {result.path}")
    console.print(f"held-out domain perplexity {m['eval_ppl_before']:.2f} -> {m['eval_ppl_after']:.2f} "
                  f"({100 * m['ppl_reduction']:.1f}% lower); general loss {m['general_loss_before']:.3f} -> {m['general_loss_after']:.3f}")
