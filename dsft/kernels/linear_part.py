"""A dense linear whose weight carries one trained part: ``y = x W_ext^T`` for W_ext [N, K] whose last r rows
hold the values of ``part`` [r, K] (kept there by the caller), with gradients for x and ``part`` only.

This is the dense counterpart of ``dsft::gmm_part``'s "cols": a LoRA factor A stored under the frozen weight
W (W_ext = [W; A]) gives ``x W^T`` and ``x A^T`` from one GEMM in the forward, and the input gradient of both,
``[dy | dh] W_ext``, from one GEMM in the backward (three GEMMs and an add otherwise).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("dsft::linear_part", mutates_args=())
def linear_part(x: torch.Tensor, w: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    return F.linear(x, w)


@linear_part.register_fake
def _(x, w, part):
    return x.new_empty((*x.shape[:-1], w.shape[0]))


def _setup(ctx, inputs, output):
    x, w, part = inputs
    ctx.needs_x, ctx.needs_part = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    ctx.r, ctx.part_dtype = part.shape[0], part.dtype
    ctx.save_for_backward(x if ctx.needs_part else None, w)


def _backward(ctx, dy):
    x, w = ctx.saved_tensors
    dx = dy @ w if ctx.needs_x else None
    dpart = None
    if ctx.needs_part:
        tail = dy[..., dy.shape[-1] - ctx.r :].reshape(-1, ctx.r)
        # ``part`` may be the fp32 master of a bf16 slot in w: the forward never reads it, so it is passed
        # as it is (no cast kernel per forward) and only its gradient is cast.
        dpart = (tail.T @ x.reshape(-1, x.shape[-1])).to(ctx.part_dtype)
    return dx, None, dpart


linear_part.register_autograd(_backward, setup_context=_setup)
