"""Turn a stage's data sources (bundled domain corpora, general replay, user files) into token tensors."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from dsft.recipes.schema import Stage

Tensors = dict[str, torch.Tensor]


@lru_cache(maxsize=8)
def _corpus(pack, seed: int):
    from dsft.domains.generate import generate_corpus

    return generate_corpus(pack, seed=seed)


def raw_examples(tokenizer, texts: Sequence[str], seq_len: int) -> Tensors:
    """Pack documents (EOS-separated) into full blocks; every token is a target."""
    from dsft.data.tokenize import pack_texts

    ids = pack_texts(tokenizer, list(texts), seq_len)
    labels = ids.clone()
    labels[ids == tokenizer.pad_token_id] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": (labels != -100).long() | (ids != tokenizer.pad_token_id).long()}


def instruction_examples(tokenizer, pairs: Sequence[dict[str, str]], seq_len: int) -> Tensors:
    """One example per prompt/response pair, right-padded; loss on the response only."""
    from dsft.data.tokenize import encode_instruction

    n = len(pairs)
    ids = torch.full((n, seq_len), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((n, seq_len), -100, dtype=torch.long)
    mask = torch.zeros((n, seq_len), dtype=torch.long)
    for i, pair in enumerate(pairs):
        x, y = encode_instruction(tokenizer, pair["prompt"], pair["response"], seq_len)
        x, y = torch.as_tensor(x)[:seq_len], torch.as_tensor(y)[:seq_len]
        ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = x, y, 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def records_examples(tokenizer, records: Sequence[Any], seq_len: int, kind: str) -> Tensors:
    """User records: raw texts are packed; instruction and chat records are encoded one by one."""
    from dsft.data.tokenize import build_examples

    return _as_tensors(build_examples(tokenizer, list(records), seq_len))


def _as_tensors(ex: Any) -> Tensors:
    if isinstance(ex, dict):
        return {k: torch.as_tensor(ex[k]) for k in ("input_ids", "labels", "attention_mask")}
    return {k: torch.as_tensor(getattr(ex, k)) for k in ("input_ids", "labels", "attention_mask")}


def concat(parts: Sequence[Tensors]) -> Tensors:
    return {k: torch.cat([p[k] for p in parts]) for k in ("input_ids", "labels", "attention_mask")}


def eval_sets(pack, general, tokenizer, seq_len: int, seed: int) -> tuple[dict[str, Tensors], dict[str, int]]:
    """Held-out domain (raw text + instruction responses) and general sets, with their counted tokens."""
    dom, gen = _corpus(pack, 0), _corpus(general, 0)
    sets = {
        "domain": concat([raw_examples(tokenizer, dom.raw_heldout, seq_len), instruction_examples(tokenizer, dom.instruct_heldout, seq_len)]),
        "general": raw_examples(tokenizer, gen.raw_heldout, seq_len),
    }
    tokens = {k: int((v["labels"][:, 1:] != -100).sum()) for k, v in sets.items()}
    return sets, tokens


@dataclass(frozen=True)
class StageData:
    """The tokenised examples of one stage, already mixed by the recipe's weights."""

    examples: Tensors
    realised: dict[str, int]

    @staticmethod
    def build(stage: Stage, pack, general, tokenizer, user_records: Sequence[Any], seed: int) -> StageData:
        from dsft.data.files import load_records

        dom, gen = _corpus(pack, 0), _corpus(general, 0)
        encode = {"cpt": "raw", "sft": "instruct"}[stage.kind]
        by_source: dict[str, Tensors] = {}
        for src in stage.data:
            name = src.source
            if name == "domain.raw":
                by_source[name] = raw_examples(tokenizer, dom.raw_train, stage.seq_len)
            elif name == "domain.longtail":
                by_source[name] = raw_examples(tokenizer, dom.longtail_train, stage.seq_len)
            elif name == "domain.instruct":
                pairs = dom.instruct_train
                by_source[name] = instruction_examples(tokenizer, pairs, stage.seq_len) if encode == "instruct" else raw_examples(
                    tokenizer, [p["prompt"] + "\n" + p["response"] for p in pairs], stage.seq_len)
            elif name == "general.raw":
                by_source[name] = raw_examples(tokenizer, gen.raw_train, stage.seq_len)
            elif name == "user":
                if user_records:
                    by_source[name] = records_examples(tokenizer, user_records, stage.seq_len, encode)
            elif name.startswith("file:"):
                by_source[name] = records_examples(tokenizer, load_records([name[5:]]), stage.seq_len, encode)
        if user_records and not any(s.source == "user" for s in stage.data):
            by_source["user"] = records_examples(tokenizer, user_records, stage.seq_len, encode)
        weights = {s.source: s.weight for s in stage.data if s.source in by_source}
        if "user" in by_source and "user" not in weights:
            weights["user"] = sum(weights.values()) or 1.0  # user data given on the command line weighs as much as the rest
        n = stage.steps * stage.batch_size
        return StageData(*mix(by_source, weights, n, seed))


def mix(by_source: dict[str, Tensors], weights: dict[str, float], n: int, seed: int) -> tuple[Tensors, dict[str, int]]:
    """Draw ``n`` examples: a source is picked by weight, then an example from it (cycling a shuffled order)."""
    g = torch.Generator().manual_seed(seed)
    names = list(weights)
    w = torch.tensor([weights[k] for k in names], dtype=torch.float)
    picks = torch.multinomial(w / w.sum(), n, replacement=True, generator=g)
    parts, realised = [], {}
    for j, name in enumerate(names):
        count = int((picks == j).sum())
        realised[name] = count
        if count == 0:
            continue
        size = by_source[name]["input_ids"].shape[0]
        order = torch.cat([torch.randperm(size, generator=g) for _ in range(count // size + 1)])[:count]
        parts.append({k: v[order] for k, v in by_source[name].items()})
    merged = concat(parts)
    shuffle = torch.randperm(n, generator=g)
    return {k: v[shuffle] for k, v in merged.items()}, realised


def stage_batches(data: StageData, batch_size: int, seed: int, device) -> Callable[[int], Tensors]:
    """``batches(step)``: the step's slice of the mixed examples, on ``device``; resumable by step number."""
    def batches(step: int) -> Tensors:
        lo = step * batch_size
        return {k: v[lo : lo + batch_size].to(device) for k, v in data.examples.items()}
    return batches
