"""``dsft eval``: what an adapter gained on its domain and what it cost in general ability."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
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
    lm_eval: list[str] = typer.Option(None, "--lm-eval", help="lm-evaluation-harness tasks (comma-separated or repeated), "
                                      "scored on the base and base + adapter instead of the held-out losses (--report: lm_eval.html); needs "
                                      "pip install 'dsft[lmeval]'."),
    lm_eval_include: list[Path] = typer.Option(None, "--lm-eval-include", help="A directory of your own lm-eval task "
                                               "YAMLs (lm-eval's --include_path; repeatable)."),
    limit: float = typer.Option(None, "--limit", help="With --lm-eval: documents per task (or a fraction below 1), "
                                "for a quick look; recorded with the figures."),
    json_out: bool = typer.Option(False, "--json", help="Print everything as JSON."),
) -> None:
    """Held-out loss, base vs base + adapter (per base-tokenizer token, 95% bootstrap intervals), on your
    held-out data (--data, the headline), the domain's generated text and general text; term coverage
    measured on the held-out text; expert usage per layer; recorded in the registry as verified on that base.

    With --lm-eval TASKS: lm-evaluation-harness tasks instead, base vs base + adapter side by side.

    Example: dsft eval --adapter contracts@0.1.0 --data heldout.jsonl   |   dsft eval --compare finance@0.1.0 --compare finance@0.2.0
    |   dsft eval --adapter finance@0.1.0 --lm-eval my_task --lm-eval-include ./tasks --limit 50
    """
    from dsft.errors import UsageError
    from dsft.eval.evaluate import compare, evaluate
    from dsft.recipes.run_checks import check_device

    check_device(device)
    data = list(data or ())
    if not lm_eval and (lm_eval_include or limit is not None):
        raise UsageError("--lm-eval-include and --limit go with --lm-eval TASKS; e.g. dsft eval --adapter finance --lm-eval my_task --limit 50")
    if lm_eval:
        if compare_refs or data or mc:
            raise UsageError("--lm-eval runs lm-eval tasks only; give --data, --mc or --compare in a separate dsft eval")
        if not adapter:
            raise UsageError("--lm-eval needs --adapter REF; e.g. dsft eval --adapter finance --lm-eval hellaswag")
        _lm_eval(adapter, lm_eval, base=base, registry=registry, device=device, include=list(lm_eval_include or ()),
                 limit=limit, report=report, json_out=json_out)
        return
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


def _lm_eval(adapter: str, tasks: list[str], *, include: list[Path], limit: float | None, report: Path | None,
             json_out: bool, **kwargs: Any) -> None:
    """``dsft eval --lm-eval``: the Python API (:func:`dsft.lmeval.run.run_lm_eval`) and a table."""
    from dsft.lmeval.run import run_lm_eval

    if limit is not None and limit >= 1:
        limit = int(limit)  # lm-eval reads an int as documents and a float as a fraction
    with console.status("lm-eval: base, then base + adapter", spinner="dots") if not json_out else nullcontext():
        result = run_lm_eval(adapter, tasks, include=include, limit=limit, **kwargs)
    if report is not None:
        from dsft.eval.report import write_lm_eval_report

        result["report"] = str(write_lm_eval_report(result, report))
    if json_out:
        print_json(result)
        return
    table = Table("task", "metric", "base", "adapter", "delta")
    for r in result["rows"]:
        arrow = {True: " (higher is better)", False: " (lower is better)"}.get(r["higher_is_better"], "")
        table.add_row(r["task"], r["metric"] + arrow, _num(r["base"], r["base_stderr"]),
                      _num(r["adapter"], r["adapter_stderr"]), "" if r["delta"] is None else f"{r['delta']:+.4f}")
    console.print(f"[bold]{result['adapter']}[/] on {result['base']} (lm-eval {result['lm_eval_version']}"
                  + (f", limit {result['limit']}" if result["limit"] is not None else "") + ")")
    console.print(table)
    console.print("recorded in the registry as verified on this base (dsft registry show " + result["adapter"] + " --json)")
    if result.get("report"):
        console.print(f"report: {escape(str(result['report']))}")


def _num(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None and stderr == stderr else "")


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
