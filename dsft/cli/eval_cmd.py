"""``dsft eval``: what an adapter gained on its domain and what it cost in general ability."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from dsft.cli.common import console, guarded, print_json


@guarded
def eval_command(
    adapter: str = typer.Option(None, "--adapter", "-a", help="Adapter ref, e.g. finance@0.2.0."),
    base: str = typer.Option(None, "--base", "-b", help="Base to evaluate on (default: the one it was trained on)."),
    data: list[Path] = typer.Option(None, "--data", help="Your held-out data (any format train --data reads; repeatable): "
                                    "base vs base + adapter perplexity on it is the headline."),
    mc: Path = typer.Option(None, "--mc", help="JSONL of {question, choices, answer} for multiple-choice accuracy."),
    compare_refs: list[str] = typer.Option(None, "--compare", help="A ref to compare; give it twice: --compare finance@0.1.0 --compare finance@0.2.0."),
    registry: str = typer.Option(None, "--registry", help="Registry SQLAlchemy URL."),
    device: str = typer.Option(None, "--device", help="cpu or cuda."),
    report: Path = typer.Option(None, "--report", help="Write report.html and its PNG plots into this directory."),
    json_out: bool = typer.Option(False, "--json", help="Print everything as JSON."),
) -> None:
    """Held-out loss, base vs base + adapter (per base-tokenizer token, 95% bootstrap intervals), on your
    held-out data (--data, the headline), the domain's generated text and general text; term coverage
    measured on the held-out text; expert usage per layer; recorded in the registry as verified on that base.

    Example: dsft eval --adapter contracts@0.1.0 --data heldout.jsonl   |   dsft eval --compare finance@0.1.0 --compare finance@0.2.0
    """
    from dsft.errors import UsageError
    from dsft.eval.evaluate import compare, evaluate
    from dsft.recipes.run_checks import check_device

    check_device(device)
    data = list(data or ())
    if compare_refs:
        if len(compare_refs) != 2:
            raise UsageError(f"--compare takes exactly two refs, got {len(compare_refs)}; e.g. --compare finance@0.1.0 --compare finance@0.2.0")
        with _progress(json_out) as progress:
            result = compare(*compare_refs, base=base, registry=registry, device=device, data=data, on_progress=progress)
        if json_out:
            print_json(result)
            return
        table = Table("held-out loss", result["a"], result["b"], "difference (b - a)", "95% interval")
        for name, row in result["loss"].items():
            lo, hi = row["difference_ci"]
            table.add_row(row["set"] + (" (headline)" if name == result["headline"] else ""), f"{row[result['a']]:.4f}",
                          f"{row[result['b']]:.4f}", f"{row['difference']:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]")
        console.print(table)
        verdict = "" if result["significant"] else " (not significant: the interval spans 0)"
        console.print(f"better on {result['heldout_sets'][result['headline']]}: [bold]{result['better']}[/]{verdict}")
        if result.get("note"):
            console.print(f"[yellow]note:[/] {result['note']}")
        return
    if not adapter:
        raise UsageError("give --adapter REF (or --compare REF1 REF2); e.g. dsft eval --adapter finance")
    with _progress(json_out) as progress:
        result = evaluate(adapter, base=base, registry=registry, mc=mc, device=device, data=data, on_progress=progress)
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
    table = Table("held-out set", "base loss", "adapter loss", "change", "95% interval", "ppl base -> adapter")
    for name in result["heldout_sets"]:
        r = result[name]
        lo, hi = r["delta_ci"]
        table.add_row(r["set"] + (" (headline)" if name == result["headline"] else ""), f"{r['loss_base']:.4f}",
                      f"{r['loss_adapter']:.4f}", f"{r['delta']:+.4f}", f"[{lo:+.4f}, {hi:+.4f}]",
                      f"{r['ppl_base']:.1f} -> {r['ppl_adapter']:.1f}")
    console.print(f"[bold]{result['adapter']}[/] on {result['base']}")
    if result.get("user_heldout_unavailable"):
        console.print(f"[yellow]note:[/] {result['user_heldout_unavailable']}")
    console.print(table)
    t = result["terms"]
    if t["added"] and t["occurrences"]:
        console.print(f"terms: {t['added']} added; on {t['counted_on']} ({t['occurrences']} occurrences) a term takes "
                      f"{t['pieces_per_term_without']:.2f} tokens without the extension, {t['pieces_per_term_with']:.2f} with it; "
                      f"{100 * t['share_of_heldout_tokens']:.1f}% of its tokens are new terms")
    elif t["added"]:
        console.print(f"terms: {t['added']} added; none occurs in {t['counted_on']}")
    for layer, u in result["experts"]["domain"].items():
        g = result["experts"]["general"][layer]
        console.print(f"layer {layer}: domain entropy {u['entropy']:.2f} (top experts {[e for e, _ in u['top']]}), general {g['entropy']:.2f}")
    if result.get("report"):
        console.print(f"report: {escape(str(result['report']))}")
    if result["multiple_choice"]:
        console.print(f"multiple choice: {100 * result['multiple_choice']['accuracy']:.1f}% of {result['multiple_choice']['items']}")


@contextmanager
def _progress(quiet: bool) -> Iterator[Any]:
    """A rich progress bar (on stderr) fed by the evaluation's ``(what, done, total)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from dsft.cli.common import err_console

    bar = Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=err_console, disable=quiet, transient=True)
    task = bar.add_task("eval", total=None)
    with bar:
        yield lambda what, done, total: bar.update(task, description=what, completed=done, total=total)
