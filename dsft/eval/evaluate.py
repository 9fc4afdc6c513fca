"""``dsft eval``: held-out loss of base vs base + adapter on each held-out set (the user's data with
``--data``, the pack's generated text, general text), with bootstrap intervals; term coverage measured
on the held-out text; expert usage; optional multiple-choice accuracy; recorded in the registry."""
from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from dsft.errors import DataError, UsageError
from dsft.eval.base_cache import base_key
from dsft.eval.metrics import bootstrap_difference, bootstrap_loss, expert_usage, perplexity

Progress = Callable[[str, int, int], None]
"""``(what is running now, steps done, steps in all)``."""


def _nll(model, examples, base_key: str | None = None) -> tuple[list[float], list[int]]:
    from dsft.eval.losses import heldout_loss

    r = heldout_loss(model, examples.to_dict(), base_key=base_key)
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


def record_texts(records) -> list[str]:
    """The running text of records (raw text, prompt and response, chat turns), for counting term tokens."""
    texts = []
    for r in records:
        parts = [r.text] if r.kind == "text" else [r.prompt, r.response] if r.kind == "instruction" else [m.content for m in r.messages or ()]
        texts.append("\n".join(p for p in parts if p))
    return texts


def tokens_per_term(tokenizer, texts: Sequence[str], terms: Sequence[str]) -> tuple[float | None, int]:
    """(tokens per term occurrence, occurrences): every whole-word occurrence of a term in ``texts``, counted
    as the tokens of ``tokenizer`` that overlap it or the space before it (a lone space token counts).

    Counted on the text itself, so the figure is what training and generation see (issue 21.7), not the
    tokens of a term in isolation.
    """
    if not terms:
        return None, 0
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(t) for t in sorted(terms, key=len, reverse=True)) + r")(?!\w)")
    total = count = 0
    for text in texts:
        spans = [m.span() for m in pattern.finditer(text)]
        if not spans:
            continue
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for lo, hi in spans:
            lo -= lo > 0 and text[lo - 1] == " "
            total += sum(1 for a, b in offsets if a < hi and max(b, a + 1) > lo)
            count += 1
    return (total / count if count else None), count


def _user_heldout(data: Sequence[Path], manifest: dict[str, Any]) -> tuple[list, str | None]:
    """The user's held-out records: the ``data`` files, else the set the adapter's training run held out
    (rebuilt from the files its metrics name; the split is deterministic), else none. The second item says
    why a recorded set could not be rebuilt (its files moved or changed), or is None."""
    from dsft.data.files import load_records
    from dsft.data.user_data import rebuild_heldout
    from dsft.errors import DsftError

    if data:
        return load_records(list(data)), None
    described = (manifest.get("metrics") or {}).get("user_data") or {}
    if not described.get("heldout_records"):
        return [], None
    try:
        return list(rebuild_heldout(described)), None
    except DsftError as exc:
        return [], f"the training run's held-out data cannot be read again ({exc}); give it with --data"


def evaluate(ref: str, base: str | None = None, registry: str | None = None, mc: Path | None = None,
             device: str | None = None, record: bool = True, data: Sequence[Path] = (),
             on_progress: Progress | None = None) -> dict[str, Any]:
    """Evaluate an adapter against its base alone; record the metrics as ``verified`` on that base version.

    Args:
        data: held-out files of the user's (any format ``dsft train --data`` reads): measured as set
            ``user``, the headline figure. Without them, the set the adapter's training run held out from
            the user's data (or its ``--eval-data``), when it had one.
        on_progress: called ``(what, done, total)`` as the evaluation goes.

    Returns:
        ``{"adapter", "base", "headline": set key, "heldout_sets": {key: what it is}, "domain": {...},
        "general": {...}, "user": {...} (with ``data``), "forgetting": {...}, "terms": {...},
        "experts": {"domain": per-layer usage, "general": ...}, "multiple_choice": {...} | None,
        "raw": per-set (nll per example, tokens per example, normaliser) for comparisons}``. Each set's
        losses are per token of the base tokenizer, so adapters with added terms compare with the base.

    Raises:
        DataError: an unreadable or malformed ``data`` file.
    """
    from dsft.adapters.store import load_adapter
    from dsft.adapters.terms import plain_terms
    from dsft.base import load_base
    from dsft.domains import general_pack, resolve_domain
    from dsft.eval.heldout import corpus, eval_sets, pair_records, raw_records, set_names
    from dsft.registry import open_registry

    with open_registry(registry) as reg:
        rec = reg.resolve(ref, verify_files=True)
    manifest = rec.parsed_manifest()
    if base is None and manifest.base is None:
        raise UsageError(f"{rec.ref} does not record the base it was trained on; pass --base")
    user, unavailable = _user_heldout(data, {"metrics": dict(manifest.metrics or {})})
    base = base or manifest.base.name
    names = set_names(len(user))
    total = 2 * len(names) + 3 + bool(mc)
    done = 0

    def step(what: str) -> None:
        nonlocal done
        if on_progress is not None:
            on_progress(what, done, total)
        done += 1

    step(f"loading base {base}")
    loaded = load_base(base, device=device)
    pack, general = resolve_domain(rec.domain), general_pack()
    seq_len = max((s["seq_len"] for s in (manifest.recipe or {}).get("stages", [])), default=256)
    base_sets, _ = eval_sets(pack, general, loaded.tokenizer, seq_len, user)
    before = {}
    for k, v in base_sets.items():
        step(f"base on {names[k]}")
        before[k] = _nll(loaded.model, v, base_key(loaded.fingerprint["id"], loaded.model))
    terms = plain_terms(list(manifest.added_tokens))
    dom = corpus(pack)
    texts = record_texts(user or raw_records(dom.raw_heldout) + pair_records(dom.instruct_heldout, False))
    without, occurrences = tokens_per_term(loaded.tokenizer, texts, terms)
    step(f"attaching {rec.ref}")
    model = load_adapter(loaded.model, loaded.tokenizer, rec.path)
    with_ext, _ = tokens_per_term(loaded.tokenizer, texts, terms)
    sets, _ = eval_sets(pack, general, loaded.tokenizer, seq_len, user)
    after = {}
    for k, v in sets.items():
        step(f"adapter on {names[k]}")
        after[k] = _nll(model, v)

    headline = "user" if user else "domain"
    out: dict[str, Any] = {"adapter": rec.ref, "base": base, "headline": headline, "heldout_sets": names, "raw": {}}
    if unavailable:
        out["user_heldout_unavailable"] = unavailable
    if user:
        from dsft.data.split import record_key

        out["user_records_sha256"] = hashlib.sha256("".join(sorted(record_key(r) for r in user)).encode()).hexdigest()
    for name in sets:
        base_tokens = sum(before[name][1])
        norm = sum(after[name][1]) / base_tokens  # per token of the base tokenizer
        b = bootstrap_loss(*before[name])
        a = bootstrap_loss(*after[name], normaliser=norm)
        d = bootstrap_difference((*before[name], 1.0), (*after[name], norm))
        out["raw"][name] = (*after[name], norm)
        out[name] = {"set": names[name], "records": len(before[name][0]), "loss_base": b[0], "loss_base_ci": b[1:],
                     "loss_adapter": a[0], "loss_adapter_ci": a[1:], "ppl_base": perplexity(b[0]), "ppl_adapter": perplexity(a[0]),
                     "ppl_base_ci": [perplexity(x) for x in b[1:]], "ppl_adapter_ci": [perplexity(x) for x in a[1:]],
                     "delta": d[0], "delta_ci": d[1:]}
    out["forgetting"] = {"general_loss_change": out["general"]["delta"], "ci": out["general"]["delta_ci"]}
    start = len(loaded.tokenizer) if manifest.term_start is None else manifest.term_start
    ids = sets[headline].input_ids[sets[headline].attention_mask.bool()]
    out["terms"] = {"added": len(terms), "counted_on": names[headline], "occurrences": occurrences,
                    "share_of_heldout_tokens": float((ids >= start).float().mean()) if terms else 0.0,
                    "pieces_per_term_without": without, "pieces_per_term_with": with_ext}
    step("expert usage")
    out["experts"] = {"domain": _usage(model, loaded.spec, sets["domain"]), "general": _usage(model, loaded.spec, sets["general"])}
    if mc:
        step("multiple choice")
    out["multiple_choice"] = multiple_choice(model, loaded.tokenizer, mc) if mc else None
    if record:
        flat = {"eval_domain_loss": out["domain"]["loss_adapter"], "eval_general_loss": out["general"]["loss_adapter"],
                "eval_domain_delta": out["domain"]["delta"], "eval_general_delta": out["general"]["delta"],
                "eval_heldout_sets": names, "eval_headline": names[headline]}
        if user:
            flat.update({"eval_user_loss": out["user"]["loss_adapter"], "eval_user_delta": out["user"]["delta"]})
        if out["multiple_choice"]:
            flat["mc_accuracy"] = out["multiple_choice"]["accuracy"]
        with open_registry(registry) as reg:
            reg.record_eval(rec.ref, base_fingerprint=loaded.fingerprint, metrics=flat, name=loaded.ref.name, source=loaded.ref.source)
    if on_progress is not None:
        on_progress("done", total, total)
    return out


def compare(ref_a: str, ref_b: str, on_progress: Progress | None = None, **kwargs) -> dict[str, Any]:
    """Both versions' held-out losses and the difference (b - a) with its 95% bootstrap interval, per set;
    ``better`` is decided on the headline set (the user's held-out data when given)."""
    def part(label: str) -> Progress | None:
        return None if on_progress is None else lambda what, done, total: on_progress(f"{label}: {what}", done, total)

    a = evaluate(ref_a, on_progress=part(ref_a), **kwargs)
    b = evaluate(ref_b, on_progress=part(ref_b), **kwargs)
    rows, note = {}, None
    if "user" in a["raw"] and a.get("user_records_sha256") != b.get("user_records_sha256"):
        # Without --data each version is measured on its own run's held-out set: different records do not compare.
        note = "the two versions were held out on different user data; give --data FILE to compare on one set"
    for name in a["raw"]:
        if name not in b["raw"] or (name == "user" and note):
            continue
        diff = bootstrap_difference(a["raw"][name], b["raw"][name])
        rows[name] = {"set": a["heldout_sets"][name], ref_a: a[name]["loss_adapter"], ref_b: b[name]["loss_adapter"],
                      "difference": diff[0], "difference_ci": diff[1:]}
    head = a["headline"] if a["headline"] in rows else "domain"
    better = ref_b if rows[head]["difference"] < 0 else ref_a
    significant = rows[head]["difference_ci"][1] < 0 or rows[head]["difference_ci"][0] > 0
    return {"a": ref_a, "b": ref_b, "headline": head, "heldout_sets": a["heldout_sets"], "loss": rows,
            "better": better, "significant": significant, **({"note": note} if note else {})}
