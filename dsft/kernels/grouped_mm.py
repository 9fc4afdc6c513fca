"""The grouped GEMM (``torch.nn.functional.grouped_mm``, or the private ``torch._grouped_mm`` it wraps on a torch
without it) behind custom ops, so that compiled graphs cannot hand it tensors in a
layout it rejects (inductor is free to drop a ``.contiguous()`` it sees as value-preserving), and so
that the backward computes only the gradients that are needed (none for a frozen expert weight).

    y  = gmm(x, w, offs)           x [S, K] sorted by group, w [G, K, N]        -> [S, N]
    dw = gmm_wgrad(x, dy, offs)    per group x_g^T dy_g (zero for an empty group) -> [G, K, N]
    y  = gmm_part(x, w, part, offs, where)   as gmm, where ``part`` is the part of w that trains (ESFT's
                                   selected experts, a folded LoRA factor; see PARTS): the backward gives
                                   dx and part's gradient, and none for the rest of w
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def has_grouped_mm() -> bool:
    """Whether this torch has a grouped GEMM kernel (public or private)."""
    return hasattr(F, "grouped_mm") or hasattr(torch, "_grouped_mm")


def grouped_mm_kernel(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [S, K] @ w [G, K, N] per group of rows ending at ``offs``: the public op where torch has it."""
    op = getattr(F, "grouped_mm", None)
    return op(x, w, offs=offs) if op is not None else torch._grouped_mm(x, w, offs=offs)


def _grouped_ok(t: torch.Tensor) -> bool:
    """The kernel reads a matrix row-major or column-major: one of the last two strides must be 1."""
    return t.stride(-1) == 1 or t.stride(-2) == 1


def _fixed(t: torch.Tensor) -> torch.Tensor:
    return t if _grouped_ok(t) else t.contiguous()


@torch.library.custom_op("dsft::gmm", mutates_args=())
def gmm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return grouped_mm_kernel(x.contiguous(), _fixed(w), offs)


@gmm.register_fake
def _(x, w, offs):
    return x.new_empty((x.shape[0], w.shape[-1]))


@torch.library.custom_op("dsft::gmm_wgrad", mutates_args=())
def gmm_wgrad(x: torch.Tensor, dy: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    dw = grouped_mm_kernel(x.t(), dy.contiguous(), offs)
    # A group with no rows (an expert no token chose this step) is never written by the kernel: its
    # slice is whatever the caching allocator held, NaN at times on CUDA (pytorch#154557, #193633).
    # Its gradient is zero; where(), not a multiply, because 0 * NaN is NaN.
    rows = torch.diff(offs, prepend=offs.new_zeros(1))
    return torch.where((rows > 0).view(-1, 1, 1), dw, dw.new_zeros(()))


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


PARTS = ("head", "rows", "cols")
"""Which part of w [G, K, N] a trained ``part`` of :func:`gmm_part` holds: ``head`` = w[:H] (the first H groups,
same storage: ESFT's selected experts), ``rows`` = w[:, K-r:] (the last r input rows: gate_up's folded B),
``cols`` = w[..., N-r:] (the last r output columns: down's folded A). In the last two, the caller keeps
the values in w equal to ``part``'s."""


@torch.library.custom_op("dsft::gmm_part", mutates_args=())
def gmm_part(x: torch.Tensor, w: torch.Tensor, part: torch.Tensor, offs: torch.Tensor, where: str) -> torch.Tensor:
    # The forward reads ``part`` through w: one GEMM serves the trained and the frozen part alike.
    return grouped_mm_kernel(x.contiguous(), _fixed(w), offs)


@gmm_part.register_fake
def _(x, w, part, offs, where):
    return x.new_empty((x.shape[0], w.shape[-1]))


def _setup_part(ctx, inputs, output):
    x, w, part, offs, where = inputs
    if where not in PARTS:
        raise ValueError(f"gmm_part: where must be one of {PARTS}, got {where!r}")
    ctx.needs_x, ctx.needs_part = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
    ctx.where, ctx.size = where, part.shape[0] if where == "head" else part.shape[1] if where == "rows" else part.shape[2]
    kept = x if ctx.needs_part else None
    if kept is not None and where == "rows":
        # part's gradient reads only x's last r columns (gate_up's folded LoRA input, r of hidden + r): a copy of
        # them is saved, not x, which would hold the routed pairs' hidden states (~25 KB a token a layer in
        # bf16 on DeepSeek-V2-Lite) for the backward.
        kept = x[:, x.shape[1] - ctx.size :].contiguous()
    ctx.save_for_backward(kept, w, offs)


def _backward_part(ctx, dy):
    x, w, offs = ctx.saved_tensors
    dx = gmm(dy, w.transpose(-1, -2), offs) if ctx.needs_x else None
    dpart = None
    if ctx.needs_part:
        if ctx.where == "head":
            # Rows past the last trained group's end are outside every group: their x never meets dy here.
            dpart = gmm_wgrad(x, dy, offs[: ctx.size].contiguous())
        elif ctx.where == "rows":
            dpart = gmm_wgrad(x, dy, offs)  # x: the last r columns only (see _setup_part)
        else:
            dpart = gmm_wgrad(x, dy[:, dy.shape[1] - ctx.size :], offs)
    return dx, None, dpart, None, None


gmm_part.register_autograd(_backward_part, setup_context=_setup_part)
