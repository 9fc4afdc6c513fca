"""Chunked cross-entropy equals the plain loss over full logits, in value and in gradient."""
from __future__ import annotations

import torch

from dsft.kernels.chunked_ce import chunked_causal_lm_loss
from dsft.recipes.loop import causal_lm_loss


def test_chunked_loss_and_gradients_equal_the_full_logits_loss():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(3, 11, 16, requires_grad=True)
    labels = torch.randint(0, 50, (3, 11))
    labels[0, :4] = -100  # a prompt that takes no loss
    full = causal_lm_loss(head(hidden), labels)
    g_full = torch.autograd.grad(full, [hidden, head.weight])
    chunked = chunked_causal_lm_loss(hidden, head, labels, chunk_size=7)  # chunks straddle rows
    g_chunked = torch.autograd.grad(chunked, [hidden, head.weight])
    torch.testing.assert_close(chunked, full)
    for a, b in zip(g_chunked, g_full):
        torch.testing.assert_close(a, b)
