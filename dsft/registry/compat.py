"""Does an adapter fit a base-model version? Decided from its manifest and the base's fingerprint.

Pure functions: no database, no torch. The registry stores what these return; ``dsft registry check``
and the loader ask them before touching any weights, so a mismatch is reported with every reason
instead of a ``size mismatch`` traceback (or, worse, silently wrong output).

A fingerprint is the dict that ``dsft.base`` computes::

    {"id": ..., "architecture": "DeepseekV2ForCausalLM", "model_type": ..., "config_hash": ...,
     "tokenizer_hash": ..., "weights_hash": ..., "vocab_size": 4096, "param_shapes": {name: [dims]}}

The manifest is ``dsft_adapter.json``; what is read here is ``base.fingerprint`` (the base the adapter
was trained on, without ``param_shapes``), ``target_shapes``, ``added_tokens`` and ``base_vocab_size``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["verified", "compatible", "incompatible"]
STATUSES: tuple[Status, ...] = ("verified", "compatible", "incompatible")
OK_STATUSES: frozenset[str] = frozenset({"verified", "compatible"})


@dataclass(frozen=True)
class Decision:
    """The outcome of the rules: a status and every reason for it (notes, when not incompatible)."""

    status: Status
    reasons: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES


def _short(h: Any) -> str:
    return str(h)[:12] if h else "unknown"


def _int(v: Any) -> int | None:
    try:
        return int(v) if v is not None else None
    except (TypeError, ValueError):
        return None


def _shape(s: Any) -> list[int] | None:
    if s is None:
        return None
    try:
        return [int(d) for d in s]
    except (TypeError, ValueError):
        return None


def trained_fingerprint(manifest: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The fingerprint of the base an adapter was trained on, as its manifest records it (None: unknown)."""
    base = manifest.get("base") or {}
    fp = base.get("fingerprint") if isinstance(base, Mapping) else None
    return fp if isinstance(fp, Mapping) and fp else None


def adapter_architecture(manifest: Mapping[str, Any]) -> str | None:
    """The architecture an adapter was trained for, or None when its manifest does not say."""
    fp = trained_fingerprint(manifest)
    arch = fp.get("architecture") if fp else None
    return arch or None


def architecture_mismatch(manifest: Mapping[str, Any], architecture: str | None) -> str | None:
    """Why an adapter cannot fit a base of ``architecture`` (None: it may; the other rules decide).

    Needs the base's config only, so ``registry check`` answers a mismatch without fingerprinting the base.
    """
    trained = adapter_architecture(manifest)
    if trained and architecture and trained != architecture:
        return f"architecture differs: adapter trained on {trained}, base is {architecture}"
    return None


def incompatibilities(manifest: Mapping[str, Any], base: Mapping[str, Any]) -> list[str]:
    """Every reason the adapter described by ``manifest`` cannot be loaded onto ``base``.

    Args:
        manifest: the adapter's ``dsft_adapter.json`` as a dict.
        base: the candidate base's fingerprint (with ``param_shapes``).
    Returns:
        Reasons in a stable order (architecture, vocabulary, tokenizer, then modules by name); empty
        when it loads.
    """
    reasons: list[str] = []
    trained = trained_fingerprint(manifest) or {}

    arch = architecture_mismatch(manifest, base.get("architecture"))
    if arch:
        reasons.append(arch)

    vocab_a, vocab_b = _int(manifest.get("base_vocab_size")), _int(base.get("vocab_size"))
    if vocab_a is not None and vocab_b is not None and vocab_a != vocab_b:
        reasons.append(
            f"vocabulary size differs: adapter extends a {vocab_a}-token vocabulary, base has {vocab_b} tokens"
        )

    added: Sequence[str] = manifest.get("added_tokens") or []
    tok_a, tok_b = trained.get("tokenizer_hash"), base.get("tokenizer_hash")
    if added and tok_a and tok_b and tok_a != tok_b:
        reasons.append(
            f"tokenizer changed (adapter trained with tokenizer {_short(tok_a)}, base has {_short(tok_b)}): "
            f"its term extension ({len(added)} added token{'s' if len(added) != 1 else ''}) needs the same "
            "tokenizer; retrain on this base"
        )

    targets: Mapping[str, Any] = manifest.get("target_shapes") or {}
    shapes = base.get("param_shapes")
    if targets and not isinstance(shapes, Mapping):
        reasons.append("base fingerprint has no param_shapes, so module shapes cannot be checked; "
                       "re-fingerprint the base with this version of dsft")
    elif targets and isinstance(shapes, Mapping):
        for name in sorted(targets):
            want, have = _shape(targets[name]), _shape(shapes.get(name))
            if have is None:
                reasons.append(f"module {name}: adapter expects shape {want}, base has no such parameter")
            elif want != have:
                reasons.append(f"module {name}: adapter expects shape {want}, base has {have}")
    return reasons


def notes(manifest: Mapping[str, Any], base: Mapping[str, Any], *, verified: bool) -> list[str]:
    """Why a loadable adapter is ``verified`` or only ``compatible`` on ``base``."""
    trained = trained_fingerprint(manifest)
    out: list[str] = []
    if verified:
        out.append("evaluated on this base version")
    elif trained is None:
        out.append("trained on an unrecorded base (imported); module shapes match; "
                   "not evaluated on this base yet: run `dsft eval` to verify")
    elif trained.get("weights_hash") and trained.get("weights_hash") == base.get("weights_hash"):
        out.append("same weights as the base it was trained on; not evaluated on this base version yet")
    else:
        out.append("weights differ from the base it was trained on: it loads, but is not evaluated "
                   "on this base yet; run `dsft eval` to record metrics")
    if trained is not None and not trained.get("architecture"):
        out.append("training base architecture unrecorded; judged on module shapes only")
    tok_a, tok_b = (trained or {}).get("tokenizer_hash"), base.get("tokenizer_hash")
    if tok_a and tok_b and tok_a != tok_b and not manifest.get("added_tokens"):
        out.append("tokenizer differs from the training base's; the adapter adds no tokens, so it loads, "
                   "but outputs may shift")
    return out


def decide(manifest: Mapping[str, Any], base: Mapping[str, Any], *, verified: bool = False) -> Decision:
    """Apply the compatibility rules.

    Args:
        manifest: the adapter's manifest.
        base: the candidate base's fingerprint.
        verified: whether metrics were recorded for this adapter on exactly this base fingerprint
            (training on it, or ``dsft eval``).
    Returns:
        ``incompatible`` with every reason when it cannot load; else ``verified`` when ``verified``,
        else ``compatible``; the reasons then are notes saying why.
    """
    reasons = incompatibilities(manifest, base)
    if reasons:
        return Decision("incompatible", tuple(reasons))
    return Decision("verified" if verified else "compatible", tuple(notes(manifest, base, verified=verified)))


def applies_to(manifest: Mapping[str, Any], architecture: str | None) -> bool:
    """Whether a new base of ``architecture`` should get a compatibility row for this adapter.

    Adapters whose training architecture is unrecorded (imported) are included: shapes decide.
    """
    arch = adapter_architecture(manifest)
    return arch is None or architecture is None or arch == architecture
