"""The held-out sets every run is measured on: the domain pack's held-out generated text, the general set,
and the user's held-out records when the run has any (named so that every figure says what it measured).

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


GENERATED_SET = "generated pack text"
GENERAL_SET = "general"


def eval_sets(pack, general, tokenizer, seq_len: int, user: Sequence[Record] = ()
              ) -> tuple[dict[str, Examples], dict[str, int]]:
    """Held-out domain (the pack's generated raw text + instruction responses) and general sets, and the
    user's held-out records as set ``user`` when there are any, with their counted tokens."""
    dom, gen = corpus(pack), corpus(general)
    sets = {
        "domain": build_examples(tokenizer, raw_records(dom.raw_heldout) + pair_records(dom.instruct_heldout, False), seq_len),
        "general": build_examples(tokenizer, raw_records(gen.raw_heldout), seq_len),
    }
    if user:
        sets["user"] = build_examples(tokenizer, list(user), seq_len)
    return sets, {k: count_tokens(v) for k, v in sets.items()}


def set_names(user_records: int = 0) -> dict[str, str]:
    """What each held-out set is, in the words reports use (issue 20.2: every figure names its set)."""
    names = {"domain": GENERATED_SET, "general": GENERAL_SET}
    if user_records:
        names["user"] = f"user held-out ({user_records} records)"
    return names


def heldout_metrics(before: dict[str, float], after: dict[str, float], user=None) -> dict:
    """The held-out figures of a run beyond the generated-text ones: the user set's losses, the name of
    every set, and the headline (the user's held-out set when there is one, else the generated text).

    Args:
        before, after: :func:`dsft.recipes.stages.evaluate` results (``<set>_loss``, ``<set>_ppl``).
        user: the run's user data (its ``heldout`` records and where they came from), or None.
    """
    # A run resumed from a checkpoint written before user sets existed has no "before" figure for one.
    n = len(user.heldout) if user is not None and "user_loss" in after and "user_loss" in before else 0
    out: dict = {"heldout_sets": set_names(n)}
    key = "user" if n else "domain"
    if n:
        out.update({"user_loss_before": before["user_loss"], "user_loss_after": after["user_loss"],
                    "user_ppl_before": before["user_ppl"], "user_ppl_after": after["user_ppl"],
                    "user_heldout_from": user.heldout_from, "user_data": user.describe()})
    out["headline"] = {"set": out["heldout_sets"][key], "key": key,
                       "loss_before": before[f"{key}_loss"], "loss_after": after[f"{key}_loss"],
                       "ppl_before": before[f"{key}_ppl"], "ppl_after": after[f"{key}_ppl"],
                       "ppl_reduction": round(1 - after[f"{key}_ppl"] / before[f"{key}_ppl"], 4)}
    return out


def scoring_sample(examples: Examples, max_tokens: int) -> Examples:
    """The first examples of ``examples`` holding up to ``max_tokens`` real tokens (at least one example)."""
    cum = examples.attention_mask.sum(1).cumsum(0)
    n = max(1, int((cum <= max_tokens).sum()))
    return examples.select(range(n))
