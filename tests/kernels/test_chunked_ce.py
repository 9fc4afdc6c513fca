"""Chunked cross-entropy equals the plain loss over full logits, in value and in gradient."""
from __future__ import annotations

import torch

from dsft.eval.losses import causal_lm_loss
from dsft.kernels.chunked_ce import chunked_causal_lm_loss


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


def test_gradients_made_in_forward_follow_the_objective_they_end_up_in():
    """The fused path stores d(loss)/d(hidden) and d(loss)/d(head params) in forward; backward scales them
    by whatever multiplies the loss (a rank's share of the batch, an auxiliary term added)."""
    torch.manual_seed(1)
    head = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9))
    full = 0.3 * causal_lm_loss(head(hidden), labels) + hidden.square().mean()
    want = torch.autograd.grad(full, [hidden, head.weight])
    got_loss = 0.3 * chunked_causal_lm_loss(hidden, head, labels, chunk_size=5) + hidden.square().mean()
    got = torch.autograd.grad(got_loss, [hidden, head.weight])
    torch.testing.assert_close(got_loss, full)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_frozen_head_and_no_grad_give_the_same_loss():
    torch.manual_seed(2)
    head = torch.nn.Linear(16, 40, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9))
    loss = chunked_causal_lm_loss(hidden, head, labels, chunk_size=4)
    (g,) = torch.autograd.grad(loss, [hidden])
    with torch.no_grad():
        torch.testing.assert_close(chunked_causal_lm_loss(hidden, head, labels, chunk_size=4), loss.detach())
    torch.testing.assert_close(g, torch.autograd.grad(causal_lm_loss(head(hidden), labels), [hidden])[0])


def test_a_chunk_follows_the_vocabulary_so_its_logits_stay_near_a_gib():
    from dsft.kernels.chunked_ce import CHUNK_BYTES, LOGIT_BYTES, chunk_positions, head_width

    assert chunk_positions(102_400) == 512        # DeepSeek-V2: 0.6 GiB a chunk, was 4,096 positions (4.7 GiB)
    assert chunk_positions(151_936) == 512        # Qwen2/3-MoE
    assert chunk_positions(32_000) == 2048        # Mixtral
    assert chunk_positions(50) == 4096            # tiny presets: one chunk, as before
    assert chunk_positions(10_000_000) == 256     # never below a GEMM worth launching
    for vocab in (32_000, 102_400, 151_936):
        assert chunk_positions(vocab) * vocab * LOGIT_BYTES <= CHUNK_BYTES
    assert head_width(torch.nn.Linear(8, 77, bias=False)) == 77


def test_the_default_chunk_gives_the_same_loss_as_one_chunk():
    torch.manual_seed(3)
    head = torch.nn.Linear(16, 40, bias=False)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    labels = torch.randint(0, 40, (2, 9))
    torch.testing.assert_close(chunked_causal_lm_loss(hidden, head, labels), causal_lm_loss(head(hidden), labels))
