"""Mixing sources by weight: seeded, realised counts match the weights, bad weights are named."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from dsft.data.mixture import Source, apportion, mix, mix_packed
from dsft.data.packing import Sequences, padding_share
from dsft.data.tokenize import Examples
from dsft.errors import DataError, UsageError


def examples(tag: int, n: int, seq_len: int = 4) -> Examples:
    """``n`` examples whose first token is ``tag`` and second their index, so a draw can be traced."""
    ids = torch.full((n, seq_len), tag, dtype=torch.long)
    ids[:, 1] = torch.arange(n)
    return Examples(ids, ids.clone(), torch.ones_like(ids))


SOURCES = {"domain": examples(1, 50), "general": examples(2, 40), "user": examples(3, 3)}


def test_realised_counts_follow_the_weights_and_the_examples_agree():
    mixed, realised = mix(SOURCES, {"domain": 6, "general": 3, "user": 1}, n_examples=100, seed=0)

    assert realised == {"domain": 60, "general": 30, "user": 10}
    assert len(mixed) == 100
    tags = Counter(mixed.input_ids[:, 0].tolist())
    assert {name: tags[tag] for name, tag in [("domain", 1), ("general", 2), ("user", 3)]} == realised


def test_uneven_weights_round_to_whole_examples_that_sum_to_n():
    realised = apportion({"a": 1, "b": 1, "c": 1}, 10)

    assert sum(realised.values()) == 10 and sorted(realised.values()) == [3, 3, 4]
    assert all(abs(realised[k] - 10 / 3) < 1 for k in realised)


def test_same_seed_same_mixture_other_seed_other_order():
    weights = {"domain": 2.0, "general": 1.0, "user": 0.5}
    a, _ = mix(SOURCES, weights, 64, seed=7)
    b, _ = mix(SOURCES, weights, 64, seed=7)
    c, _ = mix(SOURCES, weights, 64, seed=8)

    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)


def test_a_small_source_is_repeated_in_whole_passes():
    small = {"domain": SOURCES["domain"], "user": SOURCES["user"]}
    mixed, realised = mix(small, {"domain": 3, "user": 1}, n_examples=40, seed=1)

    user = mixed.input_ids[mixed.input_ids[:, 0] == 3]
    seen = Counter(user[:, 1].tolist())  # 10 draws from 3 examples: each 3 or 4 times
    assert realised["user"] == 10 and sorted(seen.values()) == [3, 3, 4]


def test_a_large_source_is_drawn_without_repeats():
    mixed, _ = mix({"domain": SOURCES["domain"]}, {"domain": 1}, n_examples=30, seed=1)

    assert len(set(mixed.input_ids[:, 1].tolist())) == 30


def test_sources_may_be_given_as_a_list_and_tensors_as_dicts():
    tensors = {name: ex.to_dict() for name, ex in SOURCES.items()}
    weights = [Source("domain", 1.0), Source("general", 1.0), Source("user", 1.0)]

    mixed, realised = mix(tensors, weights, 9, seed=0)

    assert realised == {"domain": 3, "general": 3, "user": 3} and isinstance(mixed, Examples)


@pytest.mark.parametrize("bad", [0, -0.5, math.nan, math.inf])
def test_weights_must_be_positive(bad):
    with pytest.raises(UsageError, match=rf"weight of source 'general' must be a number > 0, got {bad!r}"):
        mix(SOURCES, {"domain": 1.0, "general": bad, "user": 1.0}, 10, seed=0)
    with pytest.raises(UsageError, match="'general'"):
        Source("general", bad)


def test_every_source_needs_a_weight_and_every_weight_a_source():
    with pytest.raises(UsageError, match="unknown source 'legal'"):
        mix(SOURCES, {"domain": 1, "general": 1, "user": 1, "legal": 1}, 10, seed=0)
    with pytest.raises(UsageError, match="source 'user' has no mixture weight"):
        mix(SOURCES, {"domain": 1, "general": 1}, 10, seed=0)


def test_an_empty_source_is_a_data_error():
    with pytest.raises(DataError, match="source 'user' has no examples"):
        mix({"domain": examples(1, 5), "user": Examples.empty(4)}, {"domain": 1, "user": 1}, 10, seed=0)


# --- packed rows ---------------------------------------------------------------------------------


def sequences(tag: int, lengths: list[int]) -> Sequences:
    """Examples whose tokens are all ``tag`` (so a row's sources can be read off), labelled throughout."""
    return Sequences.from_lists([([tag] * n, [tag] * n) for n in lengths])


PACKABLE = {"short": sequences(5, [6, 7, 8, 9, 10] * 8), "long": sequences(6, [20, 24, 28, 30])}


def test_mix_packed_fills_the_rows_and_counts_examples_and_tokens_per_source():
    m = mix_packed(PACKABLE, {"short": 3, "long": 1}, rows=12, seq_len=32, pad_id=0, seed=0)

    assert m.examples.input_ids.shape == (12, 32)
    tokens = {name: int((m.examples.input_ids == tag).sum()) for name, tag in [("short", 5), ("long", 6)]}
    assert m.tokens == tokens
    starts = {name: int(((m.examples.position_ids == 0) & (m.examples.input_ids == tag)).sum())
              for name, tag in [("short", 5), ("long", 6)]}
    assert m.counts == starts
    assert abs(m.counts["short"] / sum(m.counts.values()) - 0.75) < 0.1  # the weights count examples
    assert padding_share(m.examples.attention_mask) < 0.1


def test_mix_packed_is_seeded():
    args = dict(rows=8, seq_len=32, pad_id=0)
    a = mix_packed(PACKABLE, {"short": 1, "long": 1}, seed=3, **args)
    b = mix_packed(PACKABLE, {"short": 1, "long": 1}, seed=3, **args)
    c = mix_packed(PACKABLE, {"short": 1, "long": 1}, seed=4, **args)

    assert torch.equal(a.examples.input_ids, b.examples.input_ids) and a.counts == b.counts
    assert not torch.equal(a.examples.input_ids, c.examples.input_ids)


def test_mix_packed_names_an_empty_source():
    with pytest.raises(DataError, match="source 'user' has no examples"):
        mix_packed({**PACKABLE, "user": sequences(7, [])}, {"short": 1, "long": 1, "user": 1}, 4, 32, 0, 0)
