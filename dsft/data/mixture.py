"""Mix tokenised sources by weight into one seeded, shuffled set of examples.

Counts are apportioned to the weights (largest remainder), so the realised mixture is as close to
the asked one as whole examples allow and does not depend on the seed; the seed picks which
examples and their order. A source smaller than its share is repeated in whole shuffled passes
(every example once before any twice), i.e. sampled with replacement only as much as needed.

:func:`mix_packed` does the same with variable-length examples and a fixed number of packed rows:
it draws examples by weight until they fill the rows (:mod:`dsft.data.packing`).
"""
from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from dsft.data.packing import SequenceSource, best_fit, pack_rows
from dsft.data.tokenize import Examples
from dsft.errors import DataError, UsageError


@dataclass(frozen=True)
class Source:
    """One named source of a mixture and its relative weight (weights need not sum to 1)."""

    name: str
    weight: float

    def __post_init__(self) -> None:
        check_weight(self.name, self.weight)


def check_weight(name: str, weight: object) -> None:
    """Raises UsageError unless ``weight`` is a finite number > 0."""
    ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight) and weight > 0
    if not ok:
        raise UsageError(f"mixture weight of source {name!r} must be a number > 0, got {weight!r}")


def apportion(weights: Mapping[str, float], n: int) -> dict[str, int]:
    """Split ``n`` into whole counts proportional to ``weights`` (largest remainder; ties by order)."""
    total = sum(weights.values())
    quotas = {k: n * w / total for k, w in weights.items()}
    counts = {k: math.floor(q) for k, q in quotas.items()}
    by_remainder = sorted(quotas, key=lambda k: counts[k] - quotas[k])  # stable: earlier names win ties
    for k in by_remainder[: n - sum(counts.values())]:
        counts[k] += 1
    return counts


def mix(
    sources: Mapping[str, Examples | Mapping[str, torch.Tensor]],
    weights: Mapping[str, float] | Sequence[Source],
    n_examples: int,
    seed: int,
) -> tuple[Examples, dict[str, int]]:
    """Draw ``n_examples`` from the sources in proportion to their weights, then shuffle.

    Args:
        sources: name -> examples (``Examples`` or a dict of ``input_ids``/``labels``/``attention_mask``).
        weights: name -> weight > 0, or a list of :class:`Source`; every source needs one.
        n_examples: how many examples the mixture has.
        seed: the same seed and inputs give the same mixture.

    Returns:
        ``(examples, realised)``: the mixed examples and how many came from each source (sums to
        ``n_examples``; a source with a tiny weight may get 0).

    Raises:
        UsageError: a weight is not > 0, names an unknown source, a source has no weight, or
            ``n_examples`` < 1.
        DataError: a weighted source has no examples.
    """
    weights = _checked(sources, weights, n_examples)
    rng = random.Random(seed)  # Python's generator: the same stream on every platform and torch version
    counts = apportion(weights, n_examples)
    parts = []
    for name in weights:
        ex = sources[name] if isinstance(sources[name], Examples) else Examples.from_dict(sources[name])
        if len(ex) == 0:
            raise DataError(f"source {name!r} has no examples; check its data or drop it from the mixture")
        if counts[name]:
            parts.append(ex.select(_draw(len(ex), counts[name], rng)))
    order = list(range(n_examples))
    rng.shuffle(order)
    return Examples.cat(parts).select(order), counts


def _checked(sources: Mapping[str, object], weights: Mapping[str, float] | Sequence[Source], n: int) -> dict[str, float]:
    if not isinstance(weights, Mapping):
        weights = {s.name: s.weight for s in weights}
    for name, w in weights.items():
        check_weight(name, w)
    unknown = [k for k in weights if k not in sources]
    if unknown:
        raise UsageError(f"mixture weight for unknown source {unknown[0]!r}; sources are {sorted(sources)}")
    unweighted = [k for k in sources if k not in weights]
    if unweighted:
        raise UsageError(f"source {unweighted[0]!r} has no mixture weight; give it one > 0 or drop it")
    if n < 1:
        raise UsageError(f"a mixture needs n_examples >= 1, got {n}")
    return dict(weights)


@dataclass(frozen=True)
class PackedMixture:
    """``rows`` packed rows drawn by weight, and what each source realised in them."""

    examples: Examples
    counts: dict[str, int]
    """Examples per source in the rows."""
    tokens: dict[str, int]
    """Real (non-padding) tokens per source in the rows."""


def mix_packed(sources: Mapping[str, SequenceSource], weights: Mapping[str, float] | Sequence[Source], rows: int,
               seq_len: int, pad_id: int, seed: int) -> PackedMixture:
    """Draw examples from the sources in proportion to their weights until they fill ``rows`` packed rows.

    The number of examples drawn is estimated from the sources' mean lengths and raised until the
    best-fit packing fills ``rows`` rows; the first ``rows`` rows are kept (examples beyond them are not
    counted) and shuffled. The same seed and inputs give the same rows.

    Raises:
        UsageError: as :func:`mix` (bad weights; ``rows`` < 1).
        DataError: a weighted source has no examples.
    """
    weights = _checked(sources, weights, rows)
    for name in weights:
        if len(sources[name]) == 0:
            raise DataError(f"source {name!r} has no examples; check its data or drop it from the mixture")
    names = list(weights)
    lengths = {n: sources[n].lengths.tolist() for n in names}
    total_w = sum(weights.values())
    mean_len = sum(weights[n] / total_w * sum(lengths[n]) / len(lengths[n]) for n in names)
    n_draw = max(1, math.ceil(rows * seq_len / mean_len))
    while True:
        rng = random.Random(seed)  # Python's generator: the same stream on every platform and torch version
        counts = apportion(weights, n_draw)
        drawn = [(n, i) for n in names for i in _draw(len(lengths[n]), counts[n], rng)]
        rng.shuffle(drawn)
        packed = best_fit([lengths[n][i] for n, i in drawn], seq_len)
        if len(packed) >= rows:
            break
        n_draw = math.ceil(n_draw * rows / len(packed) * 1.02) + 1
    packed = packed[:rows]
    rng.shuffle(packed)
    index = [[drawn[j] for j in row] for row in packed]
    used = [drawn[j] for row in packed for j in row]
    realised = {n: 0 for n in names}
    tokens = {n: 0 for n in names}
    for n, i in used:
        realised[n] += 1
        tokens[n] += lengths[n][i]
    examples = Examples(**pack_rows(lambda key: sources[key[0]].example(key[1]), index, seq_len, pad_id))
    return PackedMixture(examples, realised, tokens)


def _draw(size: int, k: int, rng: random.Random) -> list[int]:
    """``k`` indices into ``range(size)``: whole shuffled passes, then a sample without replacement."""
    index: list[int] = []
    while len(index) + size <= k:
        index += rng.sample(range(size), size)
    return index + rng.sample(range(size), k - len(index))
