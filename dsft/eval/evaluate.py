"""``dsft eval``: held-out domain and general loss of base vs base + adapter, with bootstrap intervals,
term coverage, expert usage, optional multiple-choice accuracy; recorded in the registry."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from dsft.errors import DataError, UsageError
from dsft.eval.metrics import bootstrap_difference, bootstrap_loss, expert_usage, perplexity


def _nll(model, examples) -> tuple[list[float], list[int]]:
    from dsft.eval.losses import heldout_loss

    r = heldout_loss(model, examples.to_dict())
    return r["per_example"], r["per_example_tokens"]


def _usage(model, spec, examples) -> dict[str, Any]:
    from dsft.base.router import RouterProbe

    probe = RouterProbe(model.get_base_model() if hasattr(model, "get_base_model") else model, spec, keep_counts=True)
    try:
        _nll(model, examples)
    finally:
        probe.close()
    return {str(layer): expert_usage(c.tolist()) for layer, c in sorted(probe.counts.items())}


def multiple_choice(model, tokenizer, path: Path) -> dict[str, Any]:
    """Accuracy on ``{question, choices, answer}`` JSONL by the log-likelihood of each choice (as lm-eval-harness)."""
    items = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            items.append((item["question"], list(item["choices"]), int(item["answer"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path} line {n}: expected {{question, choices, answer}} ({type(exc).__name__}); fix the line") from None
    correct = 0
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for question, choices, answer in items:
            q = tokenizer(question, add_special_tokens=False).input_ids
            scores = []
            for choice in choices:
                c = tokenizer(" " + choice, add_special_tokens=False).input_ids
                ids = torch.tensor([q + c], device=device)
                logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                scores.append(sum(logp[len(q) - 1 + i, t].item() for i, t in enumerate(c)))
            correct += int(max(range(len(choices)), key=scores.__getitem__) == answer)
    return {"items": len(items), "accuracy": correct / max(1, len(items))}


def evaluate(ref: str, base: str | None = None, registry: str | None = None, mc: Path | None = None,
             device: str | None = None, record: bool = True) -> dict[str, Any]:
    """Evaluate an adapter against its base alone; record the metrics as ``verified`` on that base version.

    Returns:
        ``{"adapter", "base", "domain": {...}, "general": {...}, "forgetting": {...}, "terms": {...},
        "experts": {"domain": per-layer usage, "general": ...}, "multiple_choice": {...} | None,
        "raw": per-set (nll per example, tokens per example, normaliser) for comparisons}``.
    """
    from dsft.adapters.store import load_adapter
    from dsft.base import load_base
    from dsft.domains import general_pack, resolve_domain
    from dsft.eval.heldout import eval_sets
    from dsft.registry import open_registry

    with open_registry(registry) as reg:
        rec = reg.resolve(ref, verify_files=True)
    manifest = rec.parsed_manifest()
    if base is None and manifest.base is None:
        raise UsageError(f"{rec.ref} does not record the base it was trained on; pass --base")
    base = base or manifest.base.name
    loaded = load_base(base, device=device)
    pack, general = resolve_domain(rec.domain), general_pack()
    seq_len = max((s["seq_len"] for s in (manifest.recipe or {}).get("stages", [])), default=256)
    base_sets, _ = eval_sets(pack, general, loaded.tokenizer, seq_len)
    before = {k: _nll(loaded.model, v) for k, v in base_sets.items()}
    terms = manifest.added_tokens
    pieces = [len(loaded.tokenizer(" " + t, add_special_tokens=False).input_ids) for t in terms]
    model = load_adapter(loaded.model, loaded.tokenizer, rec.path)
    sets, _ = eval_sets(pack, general, loaded.tokenizer, seq_len)
    after = {k: _nll(model, v) for k, v in sets.items()}

    out: dict[str, Any] = {"adapter": rec.ref, "base": base, "raw": {}}
    for name in ("domain", "general"):
        base_tokens = sum(before[name][1])
        norm = sum(after[name][1]) / base_tokens  # per token of the base tokenizer
        b = bootstrap_loss(*before[name])
        a = bootstrap_loss(*after[name], normaliser=norm)
        d = bootstrap_difference((*before[name], 1.0), (*after[name], norm))
        out["raw"][name] = (*after[name], norm)
        out[name] = {"loss_base": b[0], "loss_base_ci": b[1:], "loss_adapter": a[0], "loss_adapter_ci": a[1:],
                     "ppl_base": perplexity(b[0]), "ppl_adapter": perplexity(a[0]), "delta": d[0], "delta_ci": d[1:]}
    out["forgetting"] = {"general_loss_change": out["general"]["delta"], "ci": out["general"]["delta_ci"]}
    start = len(loaded.tokenizer) if manifest.term_start is None else manifest.term_start
    ids = sets["domain"].input_ids[sets["domain"].attention_mask.bool()]
    out["terms"] = {"added": len(terms), "share_of_heldout_tokens": float((ids >= start).float().mean()) if terms else 0.0,
                    "pieces_per_term_without": sum(pieces) / len(pieces) if pieces else None,
                    "pieces_per_term_with": 1.0 if terms else None}
    out["experts"] = {"domain": _usage(model, loaded.spec, sets["domain"]), "general": _usage(model, loaded.spec, sets["general"])}
    out["multiple_choice"] = multiple_choice(model, loaded.tokenizer, mc) if mc else None
    if record:
        flat = {"eval_domain_loss": out["domain"]["loss_adapter"], "eval_general_loss": out["general"]["loss_adapter"],
                "eval_domain_delta": out["domain"]["delta"], "eval_general_delta": out["general"]["delta"]}
        if out["multiple_choice"]:
            flat["mc_accuracy"] = out["multiple_choice"]["accuracy"]
        with open_registry(registry) as reg:
            reg.record_eval(rec.ref, base_fingerprint=loaded.fingerprint, metrics=flat, name=loaded.ref.name, source=loaded.ref.source)
    return out


def compare(ref_a: str, ref_b: str, **kwargs) -> dict[str, Any]:
    """Both versions' held-out losses and the difference (b - a) with its 95% bootstrap interval."""
    a, b = evaluate(ref_a, **kwargs), evaluate(ref_b, **kwargs)
    rows = {}
    for name in ("domain", "general"):
        diff = bootstrap_difference(a["raw"][name], b["raw"][name])
        rows[name] = {ref_a: a[name]["loss_adapter"], ref_b: b[name]["loss_adapter"], "difference": diff[0], "difference_ci": diff[1:]}
    return {"a": ref_a, "b": ref_b, "loss": rows}
