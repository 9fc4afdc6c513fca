"""Causal-LM cross-entropy without materialising the whole batch's logits.

With a 102,400-token vocabulary, 4 x 2048 tokens of fp32 logits are 3.4 GB, and their gradient as
much again. Here the output head runs on chunks of positions, and each chunk's logits exist only
while its loss and gradients are computed.

Training (:class:`_GradInForward`): each chunk's gradient with respect to the hidden states (and to the
head's trainable parameters, e.g. new term rows) is computed right in the forward pass, while its
logits exist; backward only scales the stored gradients by the incoming one. The logits GEMM and
the softmax run once per step. (Checkpointing each chunk, the simple alternative, runs both twice.)
Elsewhere, and for heads sharded by FSDP2 (whose hooks expect one forward per backward), chunks run
under activation checkpointing.

A chunk's size follows the vocabulary (:func:`chunk_positions`): its logits, their fp32 copy and both gradients
(12 bytes a value from bf16) are the step's largest transient when every layer recomputes, so a chunk is kept
under ~1 GiB. 4,096 positions x 102,400 tokens were 4.7 GiB at the peak (DeepSeek-V2-Lite); 512 are 0.6 GiB, and
512 x 2,048 x 102,400 is still a GEMM that fills the GPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

CHUNK_BYTES = 1 << 30
"""Budget of one chunk's logits with their fp32 copies and gradients."""
LOGIT_BYTES = 12
"""Bytes a logit costs inside a chunk: bf16 logits (2), their fp32 copy (4), its gradient (4), the bf16 gradient (2)."""


def chunk_positions(vocab: int) -> int:
    """Positions per chunk of the output head for a ``vocab``-wide head: the largest power of two whose logits fit
    :data:`CHUNK_BYTES` (:data:`LOGIT_BYTES` each), between 256 and 4,096 (512 for 102,400 tokens)."""
    fits = max(1, CHUNK_BYTES // (LOGIT_BYTES * max(1, vocab)))
    return min(4096, max(256, 1 << (fits.bit_length() - 1)))


def head_width(head: nn.Module) -> int:
    """The output head's vocabulary: ``out_features`` (nn.Linear, term-extended heads) or its weight's rows."""
    width = getattr(head, "out_features", None)
    return int(width) if width is not None else int(head.weight.shape[0])


def _chunk_loss(head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, ignore_index=-100, reduction="sum")


class _GradInForward(torch.autograd.Function):
    """Summed loss of ``head`` over ``h`` in chunks; gradients for ``h`` and ``params`` made in forward."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, y: torch.Tensor, head: nn.Module, chunk_size: int, *params: torch.Tensor) -> torch.Tensor:
        total = h.new_zeros((), dtype=torch.float32)
        grad_h = torch.empty_like(h)
        grad_params = [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            for i in range(0, h.shape[0], chunk_size):
                piece = h[i : i + chunk_size].detach().requires_grad_(True)
                loss = _chunk_loss(head, piece, y[i : i + chunk_size])
                grads = torch.autograd.grad(loss, [piece, *params], allow_unused=True)
                grad_h[i : i + chunk_size] = grads[0]
                for acc, g in zip(grad_params, grads[1:]):
                    if g is not None:
                        acc += g
                total += loss.detach()
        ctx.save_for_backward(grad_h, *grad_params)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, *grad_params = ctx.saved_tensors
        return (grad_h * grad_out.to(grad_h.dtype), None, None, None, *[g * grad_out.to(g.dtype) for g in grad_params])


def _sharded(params: list[torch.Tensor]) -> bool:
    return any(type(p).__name__ == "DTensor" or type(getattr(p, "data", None)).__name__ == "DTensor" for p in params)


def capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s work is being recorded into a CUDA graph. Selecting the labelled positions sizes a tensor by
    data, a device sync that a graph cannot hold: under capture the head runs on every position instead (the
    ignored ones add nothing to the loss or its gradients)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """Mean next-token loss of ``head(hidden)`` against ``labels`` (-100 = ignored), ``chunk_size`` positions at a time
    (default: :func:`chunk_positions` of the head's vocabulary).

    Equal to ``causal_lm_loss(head(hidden), labels)``; peak memory holds one chunk's logits. The head
    runs only on positions whose shifted label is not -100 (prompts and padding cost no logits),
    except for a head sharded by FSDP2 (every rank must call it the same number of times) and while a CUDA graph
    records the step (:func:`capturing`).
    """
    chunk_size = chunk_size or chunk_positions(head_width(head))
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = labels[:, 1:].reshape(-1)
    keep = y != -100
    count = keep.sum().clamp(min=1)
    params = [p for p in head.parameters() if p.requires_grad]
    sharded = _sharded(list(head.parameters()))
    if not sharded and not capturing(hidden):
        index = keep.nonzero().squeeze(1)
        h, y = h.index_select(0, index), y.index_select(0, index)
    if torch.is_grad_enabled() and (h.requires_grad or params) and not sharded:
        return _GradInForward.apply(h, y, head, chunk_size, *params) / count
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, h.shape[0], chunk_size):
        total = total + checkpoint(_chunk_loss, head, h[i : i + chunk_size], y[i : i + chunk_size], use_reentrant=False)
    return total / count
