"""``dsft experts score``: which routed experts a domain uses (what ESFT would train)."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from dsft.atomic import write_json_atomic
from dsft.base.presets import DEFAULT_BASE
from dsft.cli.common import console, guarded, print_json

app = typer.Typer(name="experts", help="Routed-expert analysis for ESFT.\n\nExample: dsft experts score --domain finance", no_args_is_help=True)


@app.command("score")
@guarded
def score_cmd(
    domain: str = typer.Option("finance", "--domain", "-d", help="Domain name or domain YAML file."),
    base: str = typer.Option(DEFAULT_BASE, "--base", "-b", help="Preset, local model directory or hub id."),
    method: str = typer.Option("token", "--method", help="token (ESFT-Token: share of selections) or gate (ESFT-Gate: mean gate score)."),
    p: float = typer.Option(None, "--p", help="Cumulative score to reach per layer (default 0.2 token, 0.1 gate)."),
    sample_tokens: int = typer.Option(131072, "--sample-tokens", help="Domain tokens to score on."),
    out: Path = typer.Option(None, "--out", help="Write the selection as JSON to this file."),
    json_out: bool = typer.Option(False, "--json", help="Print the selection as JSON."),
) -> None:
    """Score every routed expert per layer on the domain's text and select the smallest set reaching p.

    Example: dsft experts score --domain legal --method gate --out legal-experts.json
    """
    from dsft.recipes.experts import expert_selection

    result = expert_selection(base, domain, method=method, p=p, sample_tokens=sample_tokens)
    if out is not None:
        write_json_atomic(out, result)
    if json_out:
        print_json(result)
        return
    console.print(f"[bold]{result['domain']}[/] on {result['base']}: ESFT-{method}, p = {result['p']}, "
                  f"{result['sample_tokens']:,} tokens; {100 * result['selected_share']:.1f}% of routed experts selected")
    for layer, v in result["layers"].items():
        console.print(f"layer {layer}: experts {v['selected']}")
    if out is not None:
        console.print(f"written to {escape(str(out))}")
