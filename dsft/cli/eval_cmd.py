"""``dsft eval``: what an adapter gained on its domain and what it cost in general ability."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from dsft.cli.common import console, guarded, print_json


@guarded
def eval_command(
    adapter: str = typer.Option(None, "--adapter", "-a", help="Adapter ref, e.g. finance@0.2.0."),
    base: str = typer.Option(None, "--base", "-b", help="Base to evaluate on (default: the one it was trained on)."),
    mc: Path = typer.Option(None, "--mc", help="JSONL of {question, choices, answer} for multiple-choice accuracy."),
    compare_refs: list[str] = typer.Option(None, "--compare", help="A ref to compare; give it twice: --compare finance@0.1.0 --compare finance@0.2.0."),
    registry: str = typer.Option(None, "--registry", help="Registry SQLAlchemy URL."),
    device: str = typer.Option(None, "--device", help="cpu or cuda."),
    report: Path = typer.Option(None, "--report", help="Write report.html and its PNG plots into this directory."),
    json_out: bool = typer.Option(False, "--json", help="Print everything as JSON."),
) -> None:
    """Held-out domain and general loss, base vs base + adapter (95% bootstrap intervals), term coverage,
    expert usage per layer; the result is recorded in the registry as verified on that base.

    Example: dsft eval --adapter finance@0.1.0   |   dsft eval --compare finance@0.1.0 --compare finance@0.2.0
    """
    from dsft.errors import UsageError
    from dsft.eval.evaluate import compare, evaluate

    if compare_refs:
        if len(compare_refs) != 2:
            raise UsageError(f"--compare takes exactly two refs, got {len(compare_refs)}; e.g. --compare finance@0.1.0 --compare finance@0.2.0")
        result = compare(*compare_refs, base=base, registry=registry, device=device)
        if json_out:
            print_json(result)
            return
        table = Table("held-out loss", result["a"], result["b"], "difference (b - a)", "95% interval")
        for name, row in result["loss"].items():
            lo, hi = row["difference_ci"]
            table.add_row(name, f"{row[result['a']]:.4f}", f"{row[result['b']]:.4f}", f"{row['difference']:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]")
        console.print(table)
        return
    if not adapter:
        raise UsageError("give --adapter REF (or --compare REF1 REF2); e.g. dsft eval --adapter finance")
    result = evaluate(adapter, base=base, registry=registry, mc=mc, device=device)
    result.pop("raw")
    if report is not None:
        from dsft.errors import DsftError
        from dsft.eval.logs import read_training_log
        from dsft.eval.report import write_report
        from dsft.registry import open_registry

        try:
            with open_registry(registry) as reg:
                log = read_training_log(Path(reg.resolve(adapter).path))
        except DsftError:
            log = None  # an imported adapter has no training log; the page says what it can
        result["report"] = str(write_report(result, log, report))
    if json_out:
        print_json(result)
        return
    table = Table("held-out", "base loss", "adapter loss", "change", "95% interval", "ppl base -> adapter")
    for name in ("domain", "general"):
        r = result[name]
        lo, hi = r["delta_ci"]
        table.add_row(name, f"{r['loss_base']:.4f}", f"{r['loss_adapter']:.4f}", f"{r['delta']:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]",
                      f"{r['ppl_base']:.1f} -> {r['ppl_adapter']:.1f}")
    console.print(f"[bold]{result['adapter']}[/] on {result['base']}")
    console.print(table)
    t = result["terms"]
    if t["added"]:
        console.print(f"terms: {t['added']} added; {t['pieces_per_term_without']:.1f} pieces each without the extension; "
                      f"{100 * t['share_of_heldout_tokens']:.1f}% of held-out domain tokens are new terms")
    for layer, u in result["experts"]["domain"].items():
        g = result["experts"]["general"][layer]
        console.print(f"layer {layer}: domain entropy {u['entropy']:.2f} (top experts {[e for e, _ in u['top']]}), general {g['entropy']:.2f}")
    if result.get("report"):
        console.print(f"report: {result['report']}")
    if result["multiple_choice"]:
        console.print(f"multiple choice: {100 * result['multiple_choice']['accuracy']:.1f}% of {result['multiple_choice']['items']}")
