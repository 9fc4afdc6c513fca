"""Evaluation numbers against values computed by hand."""
from __future__ import annotations

import math

import pytest

from dsft.eval.metrics import bootstrap_difference, bootstrap_loss, entropy, expert_usage, perplexity, token_loss


def test_perplexity_of_a_uniform_distribution_is_its_size():
    # A model that spreads probability evenly over 50 tokens has loss ln 50 on every token.
    assert perplexity(math.log(50)) == pytest.approx(50.0)


def test_token_weighted_loss_weights_documents_by_their_tokens():
    assert token_loss([10.0, 2.0], [5, 1]) == pytest.approx(12 / 6)


def test_entropy_of_known_histograms():
    assert entropy([5, 5, 5, 5]) == pytest.approx(1.0)
    assert entropy([20, 0, 0, 0]) == 0.0
    assert entropy([1, 1, 0, 0]) == pytest.approx(math.log(2) / math.log(4))


def test_expert_usage_names_the_busiest_experts():
    u = expert_usage([1, 6, 3, 0])
    assert u["share_used"] == 0.75 and u["top"][0] == [1, 0.6] and u["tokens_per_expert"] == [1, 6, 3, 0]


def test_bootstrap_interval_brackets_the_loss_and_narrows_with_more_documents():
    nll, tok = [2.0, 2.2, 1.8, 2.1, 1.9] * 4, [1] * 20
    loss, lo, hi = bootstrap_loss(nll, tok)
    assert lo <= loss <= hi and loss == pytest.approx(2.0)
    _, lo2, hi2 = bootstrap_loss(nll * 10, tok * 10)
    assert hi2 - lo2 < hi - lo
    diff, dlo, dhi = bootstrap_difference((nll, tok, 1.0), ([x + 1 for x in nll], tok, 1.0))
    assert diff == pytest.approx(1.0) and dlo <= 1.0 <= dhi
