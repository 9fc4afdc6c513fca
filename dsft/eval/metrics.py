"""The numbers of an evaluation, as pure functions (no model, no files)."""
from __future__ import annotations

import math
import random
from collections.abc import Sequence


def token_loss(nll: Sequence[float], tokens: Sequence[int]) -> float:
    """Token-weighted mean loss of documents given their summed NLL and their token counts."""
    return sum(nll) / max(1, sum(tokens))


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def bootstrap_loss(nll: Sequence[float], tokens: Sequence[int], n: int = 1000, seed: int = 0,
                   normaliser: float = 1.0) -> tuple[float, float, float]:
    """(loss, low, high): the token-weighted loss and its 95% interval from resampling documents.

    ``normaliser`` rescales for a different token count than the one the NLL was summed over (the
    adapter's tokenizer merges terms; losses are reported per token of the base tokenizer).
    """
    rng = random.Random(seed)
    m = len(nll)
    stats = []
    for _ in range(n):
        idx = [rng.randrange(m) for _ in range(m)]
        stats.append(sum(nll[i] for i in idx) / max(1, sum(tokens[i] for i in idx)) * normaliser)
    stats.sort()
    return token_loss(nll, tokens) * normaliser, stats[int(0.025 * n)], stats[int(0.975 * n) - 1]


def bootstrap_difference(a: tuple[Sequence[float], Sequence[int], float], b: tuple[Sequence[float], Sequence[int], float],
                         n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(b - a, low, high) for two independently resampled sets of documents, each (nll, tokens, normaliser)."""
    rng = random.Random(seed)

    def draw(nll, tokens, norm):
        idx = [rng.randrange(len(nll)) for _ in range(len(nll))]
        return sum(nll[i] for i in idx) / max(1, sum(tokens[i] for i in idx)) * norm

    diffs = sorted(draw(*b) - draw(*a) for _ in range(n))
    point = token_loss(b[0], b[1]) * b[2] - token_loss(a[0], a[1]) * a[2]
    return point, diffs[int(0.025 * n)], diffs[int(0.975 * n) - 1]


def entropy(counts: Sequence[float]) -> float:
    """Shannon entropy of an expert-load histogram, normalised to [0, 1] (1 = perfectly balanced)."""
    total = sum(counts)
    if total <= 0 or len(counts) < 2:
        return 0.0
    h = -sum(c / total * math.log(c / total) for c in counts if c > 0)
    return h / math.log(len(counts))


def expert_usage(counts: Sequence[float], top: int = 3) -> dict:
    """Tokens per expert, share of experts used, normalised entropy and the busiest experts of one layer."""
    total = sum(counts)
    order = sorted(range(len(counts)), key=lambda e: -counts[e])
    return {"tokens_per_expert": [int(c) for c in counts], "share_used": sum(1 for c in counts if c > 0) / len(counts),
            "entropy": round(entropy(counts), 4), "top": [[e, round(counts[e] / max(total, 1), 4)] for e in order[:top]]}
