"""``torch._grouped_mm`` behind two custom ops, so that compiled graphs cannot hand it tensors in a
layout it rejects (inductor is free to drop a ``.contiguous()`` it sees as value-preserving), and so
that the backward computes only the gradients that are needed (none for a frozen expert weight).

    y  = gmm(x, w, offs)           x [S, K] sorted by group, w [G, K, N]        -> [S, N]
    dw = gmm_wgrad(x, dy, offs)    per group x_g^T dy_g                         -> [G, K, N]
    y  = gmm_head(x, w, head, offs)  as gmm, where ``head`` is w[:H] (same storage) and is what trains:
                                   the backward gives head's gradient, H groups, and none for the rest of w
    y  = gmm_fold(x, w, tail, offs)  as gmm, where ``tail`` holds the values of w's last r rows (w[:, K-r:]):
                                   the backward gives dx and tail's gradient (x's last r columns against dy)
    y  = gmm_fold_out(x, w, tail, offs)  as gmm, where ``tail`` holds the values of w's last r output columns
                                   (w[..., N-r:]): the backward gives dx and tail's gradient (x against dy's last r columns)
"""
from __future__ import annotations

import torch


def _grouped_ok(t: torch.Tensor) -> bool:
    """The kernel reads a matrix row-major or column-major: one of the last two strides must be 1."""
    return t.stride(-1) == 1 or t.stride(-2) == 1


def _fixed(t: torch.Tensor) -> torch.Tensor:
    return t if _grouped_ok(t) else t.contiguous()


@torch.library.custom_op("dsft::gmm", mutates_args=())
def gmm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x.contiguous(), _fixed(w), offs=offs)


@gmm.register_fake
def _(x, w, offs):
    return x.new_empty((x.shape[0], w.shape[-1]))


@torch.library.custom_op("dsft::gmm_wgrad", mutates_args=())
def gmm_wgrad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(x.t(), dy.contiguous(), offs=offs)


@gmm_wgrad.register_fake
def _(x, dy, offs):
    return x.new_empty((offs.shape[0], x.shape[1], dy.shape[1]))


def _setup(ctx, inputs, output):
    x, w, offs = inputs
    ctx.needs = ctx.needs_input_grad[:2]
    # x is kept only when w needs a gradient: a frozen expert weight never costs its input.
    ctx.save_for_backward(x if ctx.needs[1] else None, w if ctx.needs[0] else None, offs)


def _backward(ctx, dy):
    x, w, offs = ctx.saved_tensors
    dx = gmm(dy, w.transpose(-1, -2), offs) if ctx.needs[0] else None
    dw = gmm_wgrad(x, dy, offs) if ctx.needs[1] else None
    return dx, dw, None


gmm.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("dsft::gmm_head", mutates_args=())
def gmm_head(x: torch.Tensor, w: torch.Tensor, head: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # head is w[:H]: the forward reads it through w, so one GEMM serves trained and frozen groups alike.
    return torch._grouped_mm(x.contiguous(), _fixed(w), offs=offs)


@gmm_head.register_fake
def _(x, w, head, offs):
    return x.new_empty((x.shape[0], w.shape[-1]))


def _setup_head(ctx, inputs, output):
    x, w, head, offs = inputs
    ctx.needs_x, ctx.needs_head = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    ctx.groups = head.shape[0]
    ctx.save_for_backward(x if ctx.needs_head else None, w, offs)


def _backward_head(ctx, dy):
    x, w, offs = ctx.saved_tensors
    dx = gmm(dy, w.transpose(-1, -2), offs) if ctx.needs_x else None
    # Rows past the last trained group's end are outside every group: their x never meets dy here.
    dhead = gmm_wgrad(x, dy, offs[: ctx.groups].contiguous()) if ctx.needs_head else None
    return dx, None, dhead, None


gmm_head.register_autograd(_backward_head, setup_context=_setup_head)


@torch.library.custom_op("dsft::gmm_fold", mutates_args=())
def gmm_fold(x: torch.Tensor, w: torch.Tensor, tail: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # tail is w[:, K-r:, :] (same values, kept there by the caller): the rows of w that train.
    return torch._grouped_mm(x.contiguous(), _fixed(w), offs=offs)


@gmm_fold.register_fake
def _(x, w, tail, offs):
    return x.new_empty((x.shape[0], w.shape[-1]))


def _setup_fold(ctx, inputs, output):
    x, w, tail, offs = inputs
    ctx.needs_x, ctx.needs_tail = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    ctx.r = tail.shape[1]
    ctx.save_for_backward(x if ctx.needs_tail else None, w, offs)


def _backward_fold(ctx, dy):
    x, w, offs = ctx.saved_tensors
    dx = gmm(dy, w.transpose(-1, -2), offs) if ctx.needs_x else None
    dtail = gmm_wgrad(x[:, x.shape[1] - ctx.r :], dy, offs) if ctx.needs_tail else None
    return dx, None, dtail, None


gmm_fold.register_autograd(_backward_fold, setup_context=_setup_fold)


@torch.library.custom_op("dsft::gmm_fold_out", mutates_args=())
def gmm_fold_out(x: torch.Tensor, w: torch.Tensor, tail: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # tail is w[..., N-r:] (same values, kept there by the caller): the output columns that train.
    return torch._grouped_mm(x.contiguous(), _fixed(w), offs=offs)


@gmm_fold_out.register_fake
def _(x, w, tail, offs):
    return x.new_empty((x.shape[0], w.shape[-1]))


def _backward_fold_out(ctx, dy):
    x, w, offs = ctx.saved_tensors
    dx = gmm(dy, w.transpose(-1, -2), offs) if ctx.needs_x else None
    dtail = gmm_wgrad(x, dy[:, dy.shape[1] - ctx.r :], offs) if ctx.needs_tail else None
    return dx, None, dtail, None


def _setup_fold_out(ctx, inputs, output):
    x, w, tail, offs = inputs
    ctx.needs_x, ctx.needs_tail = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    ctx.r = tail.shape[-1]
    ctx.save_for_backward(x if ctx.needs_tail else None, w, offs)


gmm_fold_out.register_autograd(_backward_fold_out, setup_context=_setup_fold_out)
