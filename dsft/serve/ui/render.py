"""HTML for the registry pages: Python string templates, every value through :func:`esc`.

Names, tags, reasons, recipe and card text all come from users (or from files in adapter directories), so
nothing is put into the page unescaped; links are built from validated domain and version names and escaped
anyway. The training curve is an inline SVG drawn here, so the pages need no JavaScript and no image files.
"""
from __future__ import annotations

import html
import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any
from urllib.parse import quote

from dsft.registry import AdapterRecord, CompatRecord
from dsft.serve.ui.views import Detail, Matrix, VersionRow

STATUS_COLOURS = {"verified": "#1a7f37", "compatible": "#9a6700", "incompatible": "#cf222e"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
header{background:#24292f;color:#fff;padding:10px 24px;display:flex;gap:24px;align-items:baseline}
header a{color:#fff;text-decoration:none}header .brand{font-weight:700;font-size:1.15em}
header .mode{margin-left:auto;font-size:.85em;opacity:.8}
main{max-width:1200px;margin:0 auto;padding:16px 24px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #d0d7de;padding-bottom:4px}
table{border-collapse:collapse;background:#fff;font-size:.92em}
th,td{border:1px solid #d0d7de;padding:5px 9px;text-align:left;vertical-align:top}th{background:#eaeef2}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.tag{display:inline-block;background:#ddf4ff;color:#0969da;border-radius:10px;padding:0 8px;margin:1px;font-size:.85em}
.badge{display:inline-block;color:#fff;border-radius:4px;padding:0 6px;font-size:.85em;font-weight:600}
.none{color:#8c959f}.reasons{margin:4px 0 0 0;padding-left:18px;font-size:.85em;color:#57606a}
pre{background:#fff;border:1px solid #d0d7de;padding:10px;overflow:auto;max-height:480px;font-size:.85em}
.nowrap{white-space:nowrap}.note{color:#9a6700}.muted{color:#57606a;font-size:.9em}form{display:inline}
"""


def esc(value: Any) -> str:
    """Any value as escaped HTML text (quotes too: values also go into attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _when(t: datetime | None) -> str:
    return esc(t.strftime("%Y-%m-%d %H:%M")) if t else '<span class="none">-</span>'


def _num(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return esc(v)
    return esc(f"{v:,}" if isinstance(v, int) else f"{v:.4g}")


def adapter_href(rec: AdapterRecord) -> str:
    return f"/ui/adapters/{quote(rec.domain, safe='')}/{quote(rec.version, safe='')}"


def badge(status: str | None) -> str:
    if status is None:
        return '<span class="none">not checked</span>'
    colour = STATUS_COLOURS.get(status, "#57606a")
    return f'<span class="badge" style="background:{colour}">{esc(status)}</span>'


def tags(names: Iterable[str]) -> str:
    return "".join(f'<span class="tag">{esc(t)}</span>' for t in names) or '<span class="none">-</span>'


def table(head: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """A table; ``rows`` hold HTML already escaped by the caller (cells mix text, links and badges)."""
    th = "".join(f"<th>{esc(h)}</th>" for h in head)
    thead = f"<thead><tr>{th}</tr></thead>" if any(head) else ""  # key/value tables need no header row
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{esc(cls)}">{thead}<tbody>{body}</tbody></table>'


def page(title: str, body: str, *, read_only: bool) -> str:
    mode = "read-only" if read_only else "tags editable (API key required)"
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)} - dsft registry</title>'
            f'<meta name="viewport" content="width=device-width"><style>{CSS}</style></head><body>'
            '<header><a class="brand" href="/ui">dsft registry</a><a href="/ui">Adapters</a>'
            f'<a href="/ui/compat">Compatibility</a><span class="mode">{esc(mode)}</span></header>'
            f"<main>{body}</main></body></html>")


def error_page(status: int, message: str, *, read_only: bool) -> str:
    return page(f"{status}", f"<h1>{status}</h1><p>{esc(message)}</p><p><a href=\"/ui\">All adapters</a></p>",
                read_only=read_only)


# --- the adapters page --------------------------------------------------------------------------------------------

def _summary(row: VersionRow) -> str:
    counts = row.counts()
    if not counts:
        return '<span class="none">no base rows</span>'
    return " ".join(f'<span class="nowrap">{badge(s)}&nbsp;{n}</span>' for s, n in sorted(counts.items()))


def index_page(rows: list[VersionRow], *, n_bases: int, read_only: bool) -> str:
    if not rows:
        body = ("<h1>Adapters</h1><p>The registry holds no adapters yet. Train one: "
                "<code>dsft train --domain finance</code></p>")
        return page("Adapters", body, read_only=read_only)
    cells = []
    for row in rows:
        r = row.record
        base = esc(r.base.name) if r.base else '<span class="none">unrecorded</span>'
        headline = (r.metrics or {}).get("headline") or {}
        ppl = (f'{_num(headline.get("ppl_before"))} &rarr; {_num(headline.get("ppl_after"))}'
               if headline.get("ppl_after") is not None else '<span class="none">-</span>')
        cells.append([
            esc(r.domain), f'<a href="{esc(adapter_href(r))}">{esc(r.version)}</a>'
            + (' <span class="muted">(newest)</span>' if row.newest else ""),
            tags(r.tags), esc(r.kind), base, badge(row.status_on_own_base()), _summary(row), ppl, _when(r.created_at)])
    domains = len({row.record.domain for row in rows})
    body = (f"<h1>Adapters</h1><p class=\"muted\">{len(rows)} version(s) of {domains} domain(s); "
            f"{n_bases} registered base version(s). Click a version for its metrics, training curve, data plan "
            "and recipe.</p>"
            + table(["domain", "version", "tags", "kind", "trained on", "on its base", "all bases",
                     "held-out perplexity", "created"], cells, "adapters"))
    return page("Adapters", body, read_only=read_only)


# --- the compatibility matrix -----------------------------------------------------------------------------------

def _cell(c: CompatRecord | None) -> str:
    if c is None:
        return '<span class="none" title="no row: not checked against this base (another architecture, or a base registered by an evaluation)">-</span>'
    tip = "\n".join(c.reasons)
    reasons = "".join(f"<li>{esc(x)}</li>" for x in c.reasons)
    return (f'<span title="{esc(tip)}">{badge(c.status)}</span>'
            + (f'<ul class="reasons">{reasons}</ul>' if reasons else ""))


def compat_page(m: Matrix, *, read_only: bool) -> str:
    if not m.bases or not m.rows:
        body = ("<h1>Compatibility</h1><p>Nothing to compare yet: the registry holds "
                f"{len(m.rows)} adapter version(s) and {len(m.bases)} base version(s).</p>")
        return page("Compatibility", body, read_only=read_only)
    head = ["adapter"] + [f"{b.name} ({b.id[:10]})" for b in m.bases]
    rows = [[f'<a href="{esc(adapter_href(r))}">{esc(r.ref)}</a> {tags(r.tags) if r.tags else ""}']
            + [_cell(cells.get(b.id)) for b in m.bases] for r, cells in m.rows]
    bases = table(["base version", "source", "architecture", "registered"],
                  [[esc(b.name) + f' <span class="muted">{esc(b.id[:12])}</span>', esc(b.source), esc(b.architecture),
                    _when(b.registered_at)] for b in m.bases])
    body = ("<h1>Compatibility</h1><p class=\"muted\">Each adapter version against each registered base version: "
            "<b>verified</b> (evaluated on it), <b>compatible</b> (loads, not evaluated there), <b>incompatible</b> "
            "(every reason listed). Decided from manifests and fingerprints when the base or adapter was registered.</p>"
            + table(head, rows, "matrix") + "<h2>Base versions</h2>" + bases)
    return page("Compatibility", body, read_only=read_only)


# --- one adapter version ----------------------------------------------------------------------------------------

def loss_svg(log: Sequence[Mapping[str, Any]], width: int = 640, height: int = 240) -> str:
    """The training loss per step (one polyline per stage) as inline SVG; axes labelled with min/max."""
    losses = [float(r["loss"]) for r in log]
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    pad_l, pad_r, pad_t, pad_b = 56, 12, 12, 28
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    n = max(1, len(losses) - 1)

    def xy(i: int, v: float) -> str:
        return f"{pad_l + w * i / n:.1f},{pad_t + h * (1 - (v - lo) / span):.1f}"

    palette = ["#0969da", "#cf222e", "#1a7f37", "#8250df", "#bc4c00"]
    lines, legend = [], []
    for k, stage in enumerate(dict.fromkeys(str(r.get("stage", "")) for r in log)):
        pts = []
        for j, r in enumerate(log):
            if str(r.get("stage", "")) == stage:
                pts.append(xy(j, float(r["loss"])))
        colour = palette[k % len(palette)]
        lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(pts)}"/>')
        if len(pts) == 1:
            lines.append(f'<circle r="3" fill="{colour}" cx="{pts[0].split(",")[0]}" cy="{pts[0].split(",")[1]}"/>')
        legend.append(f'<text x="{pad_l + 8 + 110 * k}" y="{pad_t + 14}" fill="{colour}" font-size="12">'
                      f"{esc(stage or 'train')}</text>")
    axes = (f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + h}" stroke="#57606a"/>'
            f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" stroke="#57606a"/>'
            f'<text x="{pad_l - 6}" y="{pad_t + 10}" text-anchor="end" font-size="11">{hi:.3f}</text>'
            f'<text x="{pad_l - 6}" y="{pad_t + h}" text-anchor="end" font-size="11">{lo:.3f}</text>'
            f'<text x="{pad_l}" y="{height - 8}" font-size="11">step 1</text>'
            f'<text x="{pad_l + w}" y="{height - 8}" text-anchor="end" font-size="11">step {len(losses)}</text>'
            f'<text x="14" y="{pad_t + h / 2}" font-size="11" transform="rotate(-90 14 {pad_t + h / 2})" '
            'text-anchor="middle">loss</text>')
    return (f'<svg role="img" aria-label="training loss" width="{width}" height="{height}" '
            f'style="background:#fff;border:1px solid #d0d7de">{axes}{"".join(lines)}{"".join(legend)}</svg>')


def _kv(pairs: Iterable[tuple[str, Any]]) -> str:
    return table(["", ""], [[esc(k), _num(v) if not isinstance(v, (dict, list)) else f"<code>{esc(json.dumps(v))}</code>"]
                            for k, v in pairs], "kv")


def _metrics(rec: AdapterRecord) -> str:
    m = rec.metrics or {}
    if not m:
        return '<p class="none">No metrics recorded (an imported adapter, or one trained before metrics existed).</p>'
    head = m.get("headline") or {}
    out = ""
    if head:
        out += (f"<p>Headline, on <b>{esc(head.get('set'))}</b>: loss {_num(head.get('loss_before'))} &rarr; "
                f"{_num(head.get('loss_after'))}, perplexity {_num(head.get('ppl_before'))} &rarr; "
                f"{_num(head.get('ppl_after'))}" + (f" ({100 * head['ppl_reduction']:.1f}% lower)"
                                                     if isinstance(head.get("ppl_reduction"), (int, float)) else "")
                + "</p>")
    flat = [(k, v) for k, v in sorted(m.items()) if not isinstance(v, (dict, list))]
    stages = [s for s in m.get("stages") or [] if isinstance(s, dict)]
    if stages:
        rows = []
        for s in stages:
            ev = s.get("eval") or {}
            rows.append([esc(s.get("stage")), esc(s.get("kind")), _num(s.get("steps")), _num(s.get("final_loss")),
                         _num(ev.get("domain_loss")), _num(ev.get("general_loss")), _num(s.get("tokens_per_s"))])
        out += table(["stage", "kind", "steps", "final train loss", "domain held-out loss", "general held-out loss",
                      "tokens/s"], rows)
    return out + ("<h3>All figures</h3>" + _kv(flat) if flat else "")


def _data_plan(rec: AdapterRecord) -> str:
    plans = [s["data"] for s in (rec.metrics or {}).get("stages") or [] if isinstance(s, dict) and isinstance(s.get("data"), dict)]
    if not plans:
        return '<p class="none">No data plan recorded.</p>'
    rows = []
    for p in plans:
        sources = p.get("sources") or {}
        for name, src in (sources.items() if isinstance(sources, dict) else []):
            src = src if isinstance(src, dict) else {}
            kinds = ", ".join(f"{_num(n)} {esc(k)}" for k, n in (src.get("records") or {}).items())
            rows.append([esc(p.get("stage")), esc(name), kinds, _num(src.get("examples")), _num(src.get("tokens")),
                         _num((p.get("mixture") or {}).get(name)), _num((p.get("mixture_tokens") or {}).get(name)),
                         f"{_num(p.get('steps'))} x {_num(p.get('batch_size'))} rows of {_num(p.get('seq_len'))}",
                         f"{100 * p['padding_share']:.1f}%" if isinstance(p.get("padding_share"), (int, float)) else "-"])
    return table(["stage", "source", "records", "examples", "tokens", "examples used", "tokens used", "steps",
                  "padding"], rows)


def _compat(d: Detail) -> str:
    by_base = {c.base_id: c for c in d.compat}
    rows = []
    for b in d.bases:
        c = by_base.get(b.id)
        rows.append([esc(b.name) + f' <span class="muted">{esc(b.id[:12])}</span>', badge(c.status if c else None),
                     "<br>".join(esc(x) for x in c.reasons) if c else "not checked against this base (no row)",
                     _when(c.checked_at if c else None)])
    if not rows:
        return '<p class="none">No base versions registered.</p>'
    return table(["base version", "verdict", "reasons", "checked"], rows)


def _evaluations(d: Detail) -> str:
    """Figures recorded on each base version by `dsft eval` (training's own, identical to the adapter's, skipped)."""
    names = {b.id: b.name for b in d.bases}
    out = ""
    for c in d.compat:
        if not c.metrics or c.metrics == (d.record.metrics or {}):
            continue
        out += (f"<h3>Recorded on {esc(names.get(c.base_id, c.base_name))} "
                f'<span class="muted">{esc(c.base_id[:12])}</span></h3>' + _kv(sorted(c.metrics.items())))
    return out


def _tag_forms(rec: AdapterRecord) -> str:
    """Set/remove forms: only rendered when the server has an API key, which the form must carry."""
    action = esc(f"/ui/adapters/{quote(rec.domain, safe='')}/tags")
    key = '<input type="password" name="key" placeholder="API key" required>'
    out = (f'<form method="post" action="{action}"><input type="hidden" name="version" value="{esc(rec.version)}">'
           f'<input name="tag" placeholder="tag, e.g. production" required> {key} '
           '<button name="op" value="set">Set tag here</button></form>')
    for t in rec.tags:
        out += (f' <form method="post" action="{action}"><input type="hidden" name="tag" value="{esc(t)}">'
                f'<input type="hidden" name="version" value="{esc(rec.version)}">{key}'
                f'<button name="op" value="remove">Remove {esc(t)}</button></form>')
    return f"<p>{out}</p>"


def detail_page(d: Detail, *, read_only: bool, message: str | None = None) -> str:
    r = d.record
    others = " ".join(f'<a href="/ui/adapters/{quote(r.domain, safe="")}/{quote(v, safe="")}">{esc(v)}</a>'
                      if v != r.version else f"<b>{esc(v)}</b>" for v in d.versions)
    trained = f"{r.base.name} ({r.base.id[:12]})" if r.base else "unrecorded"
    info = table(["", ""], [["kind", esc(r.kind)], [f"versions of {esc(r.domain)}", others],
                            ["trained on", esc(trained)], ["parent", esc(r.parent or "-")], ["created", _when(r.created_at)],
                            ["path", f"<code>{esc(r.path)}</code>"], ["manifest sha256", esc(r.manifest_sha256[:16])]], "kv")
    body = f"<h1>{esc(r.ref)} {tags(r.tags) if r.tags else ''}</h1>"
    if message:
        body += f'<p class="note">{esc(message)}</p>'
    body += info + ("" if read_only else _tag_forms(r))
    body += "<h2>Compatibility with registered base versions</h2>" + _compat(d)
    body += "<h2>Evaluation</h2>" + _metrics(r) + _evaluations(d)
    body += "<h2>Training curve</h2>" + (loss_svg(d.log) if d.log else
                                          '<p class="none">No training log (train_log.jsonl) in the adapter directory.</p>')
    body += "<h2>Data plan</h2>" + _data_plan(r)
    recipe = d.recipe_text or (json.dumps(r.recipe, indent=2) if r.recipe else None)
    body += "<h2>Recipe</h2>" + (f"<pre>{esc(recipe)}</pre>" if recipe else '<p class="none">No recipe recorded.</p>')
    if d.card_text:
        body += f"<h2>Model card</h2><details><summary>README.md</summary><pre>{esc(d.card_text)}</pre></details>"
    body += "".join(f'<p class="note">{esc(n)}</p>' for n in d.notes)
    return page(r.ref, body, read_only=read_only)
