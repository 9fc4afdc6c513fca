"""Causal-LM cross-entropy without materialising the whole batch's logits.

With a 102,400-token vocabulary, 4 x 2048 tokens of fp32 logits are 3.4 GB, and their gradient as
much again. Here the output head runs on chunks of positions under activation checkpointing: each
chunk's logits exist only while its loss (and, in backward, its gradient) is computed.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, ignore_index=-100, reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                           chunk_size: int = 4096) -> torch.Tensor:
    """Mean next-token loss of ``head(hidden)`` against ``labels`` (-100 = ignored), ``chunk_size`` positions at a time.

    Equal to ``causal_lm_loss(head(hidden), labels)``; peak memory holds one chunk's logits.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk_size):
        total = total + checkpoint(_chunk_loss, head, h[i : i + chunk_size], y[i : i + chunk_size], use_reentrant=False)
    return total / (y != -100).sum().clamp(min=1)
