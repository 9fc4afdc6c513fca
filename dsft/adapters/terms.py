"""Term-embedding extension: domain terms become new tokens whose rows alone train.

A term that the base tokenizer splits into >= 2 pieces gets a new token id in
``[start, start + n)``, where ``start = len(base_tokenizer)``. Its input row and its output-head
row start as the mean of its pieces' rows. The base matrices stay frozen and untouched: the new
rows are separate parameters, so the base rows cannot receive an update by construction.

When the model's embedding matrix has spare rows beyond the tokenizer (DeepSeek-V2 pads 100k
tokens to 102,400 rows), the new ids land in that padding and the matrix does not grow.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

TERMS_FILE = "terms.safetensors"


@dataclass(frozen=True)
class TermPlan:
    """Which terms become tokens, at which ids, initialised from which pieces."""

    terms: tuple[str, ...]
    start: int
    pieces: tuple[tuple[int, ...], ...]


def plan_terms(tokenizer, terms: Sequence[str]) -> TermPlan:
    """Pick the terms the tokenizer splits into >= 2 pieces (deduplicated, in order)."""
    chosen, pieces, seen = [], [], set(tokenizer.get_vocab())
    for term in terms:
        # A leading space is how byte-level BPE sees a word inside a sentence; that is the split that costs tokens.
        ids = tokenizer.encode(" " + term, add_special_tokens=False)
        if len(ids) >= 2 and term not in seen:
            seen.add(term)
            chosen.append(term)
            pieces.append(tuple(ids))
    return TermPlan(tuple(chosen), len(tokenizer), tuple(pieces))


class TermEmbedding(nn.Module):
    """Input embedding = frozen base rows + ``rows`` for ids in ``[start, start + n)``."""

    def __init__(self, base: nn.Embedding, start: int, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.start = start
        self.rows = nn.Parameter(rows)

    @property
    def weight(self) -> torch.Tensor:  # generation utilities read .weight for dtype/device
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = (ids >= self.start) & (ids < self.start + self.rows.shape[0])
        base_ids = torch.where(is_new | (ids >= self.base.num_embeddings), 0, ids)
        out = self.base(base_ids)
        new = self.rows[(ids - self.start).clamp(0, self.rows.shape[0] - 1)].to(out.dtype)
        return torch.where(is_new.unsqueeze(-1), new, out)


class TermHead(nn.Module):
    """Output head whose logits for the new ids come from ``rows``; the vocabulary grows to ``start + n`` if needed."""

    def __init__(self, base: nn.Linear, start: int, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.start = start
        self.rows = nn.Parameter(rows)

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def out_features(self) -> int:
        return max(self.base.out_features, self.start + self.rows.shape[0])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.base(h)
        new = h @ self.rows.to(h.dtype).t()
        end = self.start + self.rows.shape[0]
        return torch.cat([logits[..., : self.start], new, logits[..., end:]], dim=-1)


def _mean_rows(weight: torch.Tensor, pieces: Sequence[Sequence[int]]) -> torch.Tensor:
    return torch.stack([weight[list(p)].float().mean(0) for p in pieces])


def extend_model(model, tokenizer, plan: TermPlan, rows: dict[str, torch.Tensor] | None = None) -> None:
    """Add the plan's tokens to ``tokenizer`` and wrap the model's embedding and head in place.

    Args:
        rows: trained ``{"embed": [n, d], "head": [n, d]}`` (from an adapter); default: mean-of-pieces init.
    """
    if not plan.terms:
        return
    if len(tokenizer) != plan.start:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens; the term plan starts at {plan.start}")
    tokenizer.add_tokens(list(plan.terms))
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if rows is None:
        rows = {"embed": _mean_rows(embed.weight.data, plan.pieces), "head": _mean_rows(head.weight.data, plan.pieces)}
    # Trainable rows live in fp32 even when the base is bf16: they are few and Adam needs the precision.
    model.set_input_embeddings(TermEmbedding(embed, plan.start, rows["embed"].float().to(embed.weight.device)))
    model.set_output_embeddings(TermHead(head, plan.start, rows["head"].float().to(head.weight.device)))
    model.config.vocab_size = max(model.config.vocab_size, plan.start + len(plan.terms))


def term_rows(model) -> dict[str, torch.Tensor]:
    return {"embed": model.get_input_embeddings().rows.detach().cpu(), "head": model.get_output_embeddings().rows.detach().cpu()}


def save_terms(path: Path, model, plan: TermPlan) -> None:
    rows = term_rows(model)
    save_file({k: v.contiguous() for k, v in rows.items()}, str(path), metadata={"start": str(plan.start), "count": str(len(plan.terms))})


def load_terms(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def apply_rows_to_plain_model(model, start: int, rows: dict[str, torch.Tensor]) -> None:
    """Write term rows into a plain (unwrapped) model, resizing it first: how plain PEFT users load an adapter."""
    n = rows["embed"].shape[0]
    if model.get_input_embeddings().num_embeddings < start + n:
        model.resize_token_embeddings(start + n, mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[start : start + n] = rows["embed"].to(model.get_input_embeddings().weight.dtype)
        model.get_output_embeddings().weight[start : start + n] = rows["head"].to(model.get_output_embeddings().weight.dtype)
