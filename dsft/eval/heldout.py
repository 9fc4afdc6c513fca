"""The held-out sets every run is measured on: the domain pack's held-out generated text and the general set.

``corpus(pack)`` is the pack's generated corpus (fixed: the run's seed samples from it, never regenerates it).
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from dsft.data.files import Record
from dsft.data.tokenize import Examples, build_examples, count_tokens

CORPUS_SEED = 0
"""The bundled corpora are fixed (the run's seed shuffles and samples, it does not regenerate the data)."""


@lru_cache(maxsize=8)
def corpus(pack):
    from dsft.domains.generate import generate_corpus

    return generate_corpus(pack, seed=CORPUS_SEED)


def raw_records(texts: Sequence[str]) -> list[Record]:
    return [Record.raw(t) for t in texts]


def pair_records(pairs: Sequence[dict[str, str]], as_text: bool) -> list[Record]:
    if as_text:  # continued pre-training reads instruction data as plain text
        return [Record.raw(p["prompt"] + "\n" + p["response"]) for p in pairs]
    return [Record.instruction(p["prompt"], p["response"]) for p in pairs]


def eval_sets(pack, general, tokenizer, seq_len: int) -> tuple[dict[str, Examples], dict[str, int]]:
    """Held-out domain (raw text + instruction responses) and general sets, with their counted tokens."""
    dom, gen = corpus(pack), corpus(general)
    sets = {
        "domain": build_examples(tokenizer, raw_records(dom.raw_heldout) + pair_records(dom.instruct_heldout, False), seq_len),
        "general": build_examples(tokenizer, raw_records(gen.raw_heldout), seq_len),
    }
    return sets, {k: count_tokens(v) for k, v in sets.items()}


def scoring_sample(examples: Examples, max_tokens: int) -> Examples:
    """The first examples of ``examples`` holding up to ``max_tokens`` real tokens (at least one example)."""
    cum = examples.attention_mask.sum(1).cumsum(0)
    n = max(1, int((cum <= max_tokens).sum()))
    return examples.select(range(n))
