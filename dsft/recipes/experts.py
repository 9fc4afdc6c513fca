"""Score a domain's use of the routed experts on a base: what ``dsft experts score`` prints and ESFT trains."""
from __future__ import annotations

from typing import Any

from dsft.adapters.esft import DEFAULT_P, METHODS, score_experts, select_layers, selection_report
from dsft.errors import UsageError

SCORE_SEQ_LEN = 256


def expert_selection(base: str, domain: str, method: str = "token", p: float | None = None,
                     sample_tokens: int = 131072, device: str | None = None) -> dict[str, Any]:
    """Score every routed expert of ``base`` on up to ``sample_tokens`` of ``domain``'s raw training text
    and select, per layer, the smallest set of experts whose normalised scores reach ``p``.

    Args:
        base: preset, local model directory or hub id.
        domain: domain name or domain YAML file.
        method: ``token`` (ESFT-Token, share of top-k selections) or ``gate`` (ESFT-Gate, mean gate score).
        p: per-layer share to cover (default 0.2 token, 0.1 gate).
        sample_tokens: how many domain tokens to score on.

    Returns:
        ``{"domain", "base", "method", "p", "sample_tokens", "layers": {"<layer>": {"selected", "scores"}},
        "selected_share", ...}`` (see :func:`dsft.adapters.esft.selection_report`).

    Raises:
        UsageError: unknown method, p outside (0, 1] or sample_tokens < 1; NotFoundError: unknown domain or base.
    """
    from dsft.base import load_base
    from dsft.data.files import Record
    from dsft.data.tokenize import build_examples
    from dsft.domains import resolve_domain
    from dsft.eval.heldout import corpus, scoring_sample

    if method not in METHODS:
        raise UsageError(f"--method must be token or gate, got {method!r}")
    p = DEFAULT_P[method] if p is None else p
    if not 0 < p <= 1:
        raise UsageError(f"--p must be in (0, 1], got {p}")
    if sample_tokens < 1:
        raise UsageError(f"--sample-tokens must be >= 1, got {sample_tokens}")
    pack = resolve_domain(domain)
    loaded = load_base(base, device=device)
    examples = build_examples(loaded.tokenizer, [Record.raw(t) for t in corpus(pack).raw_train], SCORE_SEQ_LEN)
    scores = score_experts(loaded.model, loaded.spec, scoring_sample(examples, sample_tokens))
    selection = select_layers(scores.of(method), p)
    return {"domain": pack.name, "base": loaded.ref.name, **selection_report(scores, method, p, selection)}
