"""A self-contained HTML page (plots embedded as PNG data) that explains one adapter's evaluation."""
from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dsft.atomic import write_text_atomic


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _sets(result: dict[str, Any]) -> list[str]:
    """The held-out sets of an evaluation, headline first (older results: domain and general)."""
    names = list(result.get("heldout_sets") or ("domain", "general"))
    head = result.get("headline")
    return [head] + [n for n in names if n != head] if head in names else names


def _label(result: dict[str, Any], name: str) -> str:
    """What a set is, in words: ``user held-out (50 records)``, ``generated pack text``, ``general``."""
    label = (result.get("heldout_sets") or {}).get(name, f"{name} held-out")
    return label + (" (headline)" if name == result.get("headline") else "")


def perplexity_bars(result: dict[str, Any], png: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = _sets(result)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], [result[n]["ppl_base"] for n in names], 0.4, label="base")
    ax.bar([x + 0.2 for x in xs], [result[n]["ppl_adapter"] for n in names], 0.4, label="base + adapter")
    ax.set_xticks(list(xs), [_label(result, n) for n in names])
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def expert_heatmap(result: dict[str, Any], png: Path) -> Path:
    """Share of each layer's tokens per expert, domain data beside general data."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for ax, name in zip(axes, ("domain", "general")):
        usage = result["experts"][name]
        layers = sorted(usage, key=int)
        grid = []
        for layer in layers:
            counts = usage[layer]["tokens_per_expert"]
            total = max(1, sum(counts))
            grid.append([c / total for c in counts])
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(layers)), [f"layer {layer}" for layer in layers])
        ax.set_xlabel("expert")
        ax.set_title(f"{name} data: share of tokens")
    fig.colorbar(im, ax=axes.ravel().tolist())
    fig.savefig(png, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return png


def _img(png: Path, alt: str) -> str:
    data = base64.b64encode(png.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def write_report(result: dict[str, Any], log: Sequence[dict[str, Any]] | None, directory: Path) -> Path:
    """Write ``report.html`` and its PNGs into ``directory``; returns the HTML path."""
    from dsft.eval.logs import plot_loss

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plots = [(perplexity_bars(result, directory / "perplexity.png"), "Perplexity before and after"),
             (expert_heatmap(result, directory / "experts.png"), "Expert usage per layer")]
    if log:
        plots.insert(0, (plot_loss(log, directory / "loss.png", title=f"{result['adapter']} training loss"), "Training loss"))
    rows = "".join(
        f"<tr><td>{html.escape(_label(result, n))}</td><td>{result[n]['loss_base']:.4f}</td><td>{result[n]['loss_adapter']:.4f}</td>"
        f"<td>{result[n]['delta']:+.4f} [{result[n]['delta_ci'][0]:+.4f}, {result[n]['delta_ci'][1]:+.4f}]</td>"
        f"<td>{result[n]['ppl_base']:.1f} &rarr; {result[n]['ppl_adapter']:.1f}</td></tr>"
        for n in _sets(result))
    t = result["terms"]
    if t["added"] and t.get("occurrences") and t.get("pieces_per_term_with") is not None:
        terms = (f"<p>{t['added']} domain terms became tokens. On {html.escape(t['counted_on'])} a term took "
                 f"{t['pieces_per_term_without']:.2f} tokens without them and {t['pieces_per_term_with']:.2f} with them "
                 f"({t['occurrences']} occurrences); {100 * t['share_of_heldout_tokens']:.1f}% of its tokens are these terms.</p>")
    else:
        terms = f"<p>{t['added']} domain terms became tokens.</p>" if t["added"] else "<p>No term extension.</p>"
    mc = result.get("multiple_choice")
    mc_html = f"<p>Multiple choice: {100 * mc['accuracy']:.1f}% of {mc['items']} items.</p>" if mc else ""
    sections = "".join(f"<h2>{html.escape(title)}</h2>{_img(png, title)}" for png, title in plots)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(result['adapter'])} — dsft evaluation</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}</style></head>
<body><h1>{html.escape(result['adapter'])} on {html.escape(result['base'])}</h1>
<p>Held-out loss per token of the base tokenizer, base alone vs base + adapter; the change has a 95% bootstrap interval.
A lower domain loss is what the adapter gained; a higher general loss is what it forgot.</p>
<table><tr><th>held-out</th><th>base</th><th>adapter</th><th>change [95%]</th><th>perplexity</th></tr>{rows}</table>
{terms}{mc_html}{sections}
<p>Expert usage shows which routed experts each layer sends this domain's tokens to, next to general text: the experts
that expert-specialised fine-tuning (ESFT) would train.</p></body></html>
"""
    path = directory / "report.html"
    write_text_atomic(path, page)
    return path


def write_lm_eval_report(result: dict[str, Any], directory: Path) -> Path:
    """Write ``lm_eval.html`` into ``directory``: lm-eval's figures, base beside base + adapter (the result of
    :func:`dsft.lmeval.run.run_lm_eval`); returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    def num(value: float | None, stderr: float | None = None) -> str:
        if value is None:
            return "&ndash;"
        return f"{value:.4f}" + (f" &plusmn; {stderr:.4f}" if stderr is not None and stderr == stderr else "")

    better = {True: " &uarr;", False: " &darr;"}
    rows = "".join(
        f"<tr><td>{html.escape(r['task'])}</td><td>{html.escape(r['metric'])}{better.get(r['higher_is_better'], '')}</td>"
        f"<td>{num(r['base'], r['base_stderr'])}</td><td>{num(r['adapter'], r['adapter_stderr'])}</td>"
        f"<td>{'&ndash;' if r['delta'] is None else format(r['delta'], '+.4f')}</td></tr>"
        for r in result["rows"])
    limit = f"; at most {html.escape(str(result['limit']))} documents per task" if result.get("limit") is not None else ""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(result['adapter'])} — lm-eval</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:2em auto;color:#222}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child,td:nth-child(2){{text-align:left}}</style></head>
<body><h1>{html.escape(result['adapter'])} on {html.escape(result['base'])}: lm-evaluation-harness</h1>
<p>lm-eval {html.escape(str(result['lm_eval_version']))}{limit}. The same tasks on the base alone and on base + adapter;
&uarr; higher is better, &darr; lower is better; &plusmn; is lm-eval's standard error.</p>
<table><tr><th>task</th><th>metric</th><th>base</th><th>base + adapter</th><th>delta</th></tr>{rows}</table></body></html>
"""
    path = directory / "lm_eval.html"
    write_text_atomic(path, page)
    return path
