"""Turn a stage's data sources (bundled domain corpora, general replay, user files) into token tensors."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from dsft.data.files import Record, load_records
from dsft.data.mixture import mix
from dsft.data.tokenize import Examples, build_examples, count_tokens
from dsft.recipes.schema import Stage

CORPUS_SEED = 0
"""The bundled corpora are fixed (the run's seed shuffles and samples, it does not regenerate the data)."""


@lru_cache(maxsize=8)
def corpus(pack):
    from dsft.domains.generate import generate_corpus

    return generate_corpus(pack, seed=CORPUS_SEED)


def _raw(texts: Sequence[str]) -> list[Record]:
    return [Record.raw(t) for t in texts]


def _pairs(pairs: Sequence[dict[str, str]], as_text: bool) -> list[Record]:
    if as_text:  # continued pre-training reads instruction data as plain text
        return [Record.raw(p["prompt"] + "\n" + p["response"]) for p in pairs]
    return [Record.instruction(p["prompt"], p["response"]) for p in pairs]


def eval_sets(pack, general, tokenizer, seq_len: int) -> tuple[dict[str, Examples], dict[str, int]]:
    """Held-out domain (raw text + instruction responses) and general sets, with their counted tokens."""
    dom, gen = corpus(pack), corpus(general)
    sets = {
        "domain": build_examples(tokenizer, _raw(dom.raw_heldout) + _pairs(dom.instruct_heldout, False), seq_len),
        "general": build_examples(tokenizer, _raw(gen.raw_heldout), seq_len),
    }
    return sets, {k: count_tokens(v) for k, v in sets.items()}


def source_records(name: str, pack, general, user_records: Sequence[Record], as_text: bool) -> list[Record]:
    """The records of one named source (see :data:`dsft.recipes.schema.DATA_SOURCES`)."""
    dom = corpus(pack)
    if name == "domain.raw":
        return _raw(dom.raw_train)
    if name == "domain.longtail":
        return _raw(dom.longtail_train)
    if name == "domain.instruct":
        return _pairs(dom.instruct_train, as_text)
    if name == "general.raw":
        return _raw(corpus(general).raw_train)
    if name == "user":
        return list(user_records)
    if name.startswith("file:"):
        return load_records([name.removeprefix("file:")])
    raise ValueError(name)


@dataclass(frozen=True)
class StageData:
    """The tokenised examples of one stage, mixed by the recipe's weights, and the realised mixture."""

    examples: Examples
    realised: dict[str, int]

    @staticmethod
    def build(stage: Stage, pack, general, tokenizer, user_records: Sequence[Record], seed: int) -> StageData:
        as_text = stage.kind == "cpt"
        weights = {s.source: s.weight for s in stage.data}
        if user_records and "user" not in weights:
            # Data given with --data joins a recipe that does not name it, weighing as much as the rest together.
            weights["user"] = sum(weights.values())
        if not user_records:
            weights.pop("user", None)
        sources = {name: build_examples(tokenizer, source_records(name, pack, general, user_records, as_text), stage.seq_len)
                   for name in weights}
        return StageData(*mix(sources, weights, stage.steps * stage.batch_size, seed))


def stage_batches(data: StageData, batch_size: int, device) -> Callable[[int], dict[str, torch.Tensor]]:
    """``batches(step)``: that step's slice of the mixed examples on ``device``; resumable by step number."""
    def batches(step: int) -> dict[str, torch.Tensor]:
        lo = step * batch_size
        return {k: v[lo : lo + batch_size].to(device) for k, v in data.examples.to_dict().items()}
    return batches
