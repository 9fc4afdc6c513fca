"""``dsft export``: an adapter as a plain PEFT directory, or merged into full model weights."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from dsft.cli.common import console, guarded, print_json


@guarded
def export_command(
    ref: str = typer.Argument(..., metavar="REF", help="DOMAIN, DOMAIN@VERSION or DOMAIN@TAG."),
    out: Path = typer.Option(..., "--out", "-o", help="New directory to write (must not exist, or be empty)."),
    format: str = typer.Option("peft", "--format", "-f", help="peft (PeftModel.from_pretrained loads it) or merged (full weights)."),
    base: str = typer.Option(None, "--base", "-b", help="Base to export for (default: the one the adapter was trained on)."),
    device: str = typer.Option("cpu", "--device", help="Where to merge (merged format)."),
    registry: str = typer.Option(None, "--registry", envvar="DSFT_REGISTRY_URL", help="Registry SQLAlchemy URL."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Export an adapter for use without dsft.

    Example: dsft export finance@0.1.0 --format peft --out finance-peft
    """
    from dsft.runtime.export import export_adapter

    kwargs = {"base": base, "registry": registry}
    if format == "merged":
        from dsft.recipes.run_checks import check_device

        check_device(device)
        kwargs["device"] = device
    result = export_adapter(ref, out, format=format, **kwargs)
    if json_out:
        print_json(result.to_json())
        return
    # the path is the user's --out: escaped, so that brackets in it print as given (after the work is done)
    console.print(f"[bold green]{result.ref}[/] exported ({result.format}) to {escape(str(result.path))}: "
                  f"{escape(', '.join(result.files))}")
