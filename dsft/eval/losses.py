"""The language-model losses: training (chunked output head) and held-out (token-weighted, per example).

They sit in ``eval/`` because evaluation and the planner measure with them; the training loop
(:mod:`dsft.recipes.loop`) imports them from here, never the reverse.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dsft.data.packing import model_inputs, segment_ids
from dsft.kernels.chunked_ce import chunked_causal_lm_loss


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy; positions labelled -100 do not count."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction=reduction)


def lm_loss(model, batch: dict[str, torch.Tensor], chunk_size: int | None = None) -> torch.Tensor:
    """The training loss: decoder hidden states, then the output head in chunks on the labelled
    positions only (never the whole batch's logits at once; see :mod:`dsft.kernels.chunked_ce`).
    Packed rows (with ``position_ids``) attend within each example (:func:`dsft.data.packing.model_inputs`)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(**model_inputs(batch), use_cache=False).last_hidden_state
    return chunked_causal_lm_loss(hidden, base.get_output_embeddings(), batch["labels"], chunk_size)


def heldout_loss(model, examples: dict[str, torch.Tensor], batch_size: int = 16, base_key: str | None = None) -> dict[str, float]:
    """Token-weighted mean loss and perplexity over held-out rows, plus each example's summed loss
    (``per_example``) and counted tokens (``per_example_tokens``) for bootstrap intervals.

    Rows packed with several examples (``position_ids`` restarting per example) are split at the
    example boundaries; rows of padding only count as no example. ``base_key``: ``model`` is an unmodified
    base (:func:`dsft.eval.base_cache.base_key`), whose figures are cached on disk.
    """
    from dsft.eval.base_cache import cached_base_loss

    return cached_base_loss(base_key, examples, batch_size, lambda: _heldout_loss(model, examples, batch_size))


EVAL_TOKENS = 16384
"""Tokens per held-out forward at most: rows of GPU-sized ``seq_len`` (6,144 on an SFT-like set) 16 at a time
made 37.5 GiB of fp32 logits on the DeepSeek-V2-Lite shape and ran out of memory after training."""
HEAD_CHUNK = 4096
"""Positions whose logits exist at once (the output head runs chunk by chunk)."""


def token_nll(hidden: torch.Tensor, head: torch.nn.Module, labels: torch.Tensor, chunk: int = HEAD_CHUNK) -> torch.Tensor:
    """Next-token negative log-likelihood per position ([rows, seq - 1], fp32; 0 where the label is -100),
    from the decoder's hidden states, running the output head over ``chunk`` positions at a time."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = labels[:, 1:].reshape(-1)
    nll = torch.zeros(target.shape, dtype=torch.float32, device=hidden.device)
    for lo in range(0, len(target), chunk):
        logits = head(h[lo : lo + chunk]).float()
        nll[lo : lo + chunk] = F.cross_entropy(logits, target[lo : lo + chunk], ignore_index=-100, reduction="none")
    return nll.view(labels.shape[0], -1)


@torch.no_grad()
@torch.compiler.set_stance("force_eager")
def _heldout_loss(model, examples: dict[str, torch.Tensor], batch_size: int) -> dict[str, float]:
    # Eager: the layers compiled for training would compile again for every evaluation shape and mode
    # (tens of seconds each on a GPU) for a few forwards over a small held-out set.
    model.eval()
    device = next(model.parameters()).device
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    rows = max(1, min(batch_size, EVAL_TOKENS // max(1, examples["input_ids"].shape[1])))
    total, tokens, per_example, per_example_tokens = 0.0, 0, [], []
    for i in range(0, examples["input_ids"].shape[0], rows):
        batch = {k: v[i : i + rows].to(device) for k, v in examples.items() if v is not None}
        labels, mask = batch["labels"], batch["attention_mask"]
        hidden = base.get_decoder()(**model_inputs(batch), use_cache=False).last_hidden_state
        nll = token_nll(hidden, base.get_output_embeddings(), labels)
        counted = (labels[:, 1:] != -100)
        # each loss belongs to the example of its target position; one slot per (row, example)
        pos = batch.get("position_ids")
        seg = segment_ids(pos) if pos is not None else torch.zeros_like(labels)
        slots = seg.max().item() + 1
        flat = (seg + slots * torch.arange(labels.shape[0], device=device)[:, None])
        sums = torch.zeros(labels.shape[0] * slots, dtype=torch.float64, device=device)
        sums.index_add_(0, flat[:, 1:].reshape(-1), nll.reshape(-1).double())
        counts = torch.zeros_like(sums).index_add_(0, flat[:, 1:].reshape(-1), counted.reshape(-1).double())
        real = torch.zeros_like(sums).index_add_(0, flat.reshape(-1), mask.reshape(-1).double()) > 0
        per_example += sums[real].tolist()
        per_example_tokens += [int(c) for c in counts[real].tolist()]
        total += nll.sum().item()
        tokens += int(counted.sum())
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": tokens, "per_example": per_example,
            "per_example_tokens": per_example_tokens}
