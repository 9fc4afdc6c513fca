"""The language-model losses: training (chunked output head) and held-out (token-weighted, per example).

They sit in ``eval/`` because evaluation and the planner measure with them; the training loop
(:mod:`dsft.recipes.loop`) imports them from here, never the reverse.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dsft.kernels.chunked_ce import chunked_causal_lm_loss


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy; positions labelled -100 do not count."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction=reduction)


def lm_loss(model, batch: dict[str, torch.Tensor], chunk_size: int = 4096) -> torch.Tensor:
    """The training loss: decoder hidden states, then the output head in chunks (never the whole
    batch's logits at once; see :mod:`dsft.kernels.chunked_ce`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).last_hidden_state
    return chunked_causal_lm_loss(hidden, base.get_output_embeddings(), batch["labels"], chunk_size)


@torch.no_grad()
def heldout_loss(model, examples: dict[str, torch.Tensor], batch_size: int = 16) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over held-out examples, plus each example's summed
    loss (``per_example``) and counted tokens (``per_example_tokens``) for bootstrap intervals."""
    model.eval()
    device = next(model.parameters()).device
    total, tokens, per_example, per_example_tokens = 0.0, 0, [], []
    for i in range(0, examples["input_ids"].shape[0], batch_size):
        ids = examples["input_ids"][i : i + batch_size].to(device)
        labels = examples["labels"][i : i + batch_size].to(device)
        mask = examples["attention_mask"][i : i + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        nll = causal_lm_loss(logits, labels, reduction="none").view(ids.shape[0], -1)
        counted = (labels[:, 1:] != -100)
        per_example += nll.sum(1).tolist()
        per_example_tokens += counted.sum(1).tolist()
        total += nll.sum().item()
        tokens += int(counted.sum())
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "per_example": per_example,
            "per_example_tokens": per_example_tokens}
