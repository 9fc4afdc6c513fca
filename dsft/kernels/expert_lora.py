"""LoRA on routed experts, computed on the routed tokens with grouped GEMMs.

For the tokens routed to expert e, with frozen W_e and LoRA factors A_e (r x in), B_e (out x r):

    Y = X W_e^T + s (X A_e^T) B_e^T

computed for all experts at once on the token-expert pairs sorted by expert. W_e + B_e A_e is
never formed, so autograd never needs a gradient for the frozen W (PEFT's ``target_parameters``
materialises W + BA per step and pays a full weight-gradient GEMM for it); the backward is
dX = dY W_e + s (dY B_e) A_e, plus the small dA, dB.

On CUDA the grouped GEMMs are torch's grouped GEMM (through :mod:`dsft.kernels.grouped_mm`); elsewhere (and as the reference in tests) the
same math runs as a loop over experts.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class LowRank:
    """LoRA factors of a fused 3-D expert weight W [E, out, in]: A [E, r, in], B [E, out, r], scale s."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float


@dataclass(frozen=True)
class Routing:
    """Token-expert pairs sorted by expert. Pair i of the sorted order is flat pair ``order[i]``
    (token ``order[i] // k``); ``offs`` holds the end of each expert's run."""

    order: torch.Tensor
    weight: torch.Tensor
    offs: torch.Tensor
    expert: torch.Tensor
    """The expert of each sorted pair."""
    place: torch.Tensor
    """Where flat pair j went in the sorted order (``order``'s inverse)."""


def route(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, num_experts: int) -> Routing:
    expert = top_k_index.reshape(-1)
    order = torch.argsort(expert, stable=True)
    # histc, not bincount: bincount's output size depends on the data, which breaks CUDA graphs in compile.
    counts = torch.histc(expert.float(), bins=num_experts, min=0, max=num_experts - 1)
    place = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return Routing(order, top_k_weights.reshape(-1)[order], torch.cumsum(counts, 0).to(torch.int32), expert[order], place)


def permute(x: torch.Tensor, r: Routing, k: int) -> torch.Tensor:
    """Token rows in routed order, one per (token, choice) pair: [T, H] -> [T*k, H].

    Written as a gather from the k-fold expanded rows so that its backward is a scatter with
    unique indices plus a sum over the k choices: no atomic adds on duplicated token rows.
    """
    return x.unsqueeze(1).expand(-1, k, -1).reshape(-1, x.shape[-1])[r.order]


class _Unpermute(torch.autograd.Function):
    """Token t's k rows gathered from the routed order and summed (compiled: one kernel, no [T*k, H] scatter written
    and read back); the backward gives each routed row its token's gradient, a gather as well (plain indexing's
    backward would be an accumulating scatter: atomic adds)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, order: torch.Tensor, place: torch.Tensor, k: int) -> torch.Tensor:
        ctx.save_for_backward(order)
        ctx.k = k
        return y[place].view(-1, k, y.shape[-1]).sum(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return grad[order // ctx.k], None, None, None


def unpermute(y: torch.Tensor, r: Routing, k: int) -> torch.Tensor:
    """Routed-order rows back to tokens, summing each token's k expert outputs: [T*k, H] -> [T, H]."""
    return _Unpermute.apply(y, r.order, r.place, k)


def grouped_mm_reference(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows ``offs[e-1]:offs[e]`` of x times w[e]: the plain loop that ``torch._grouped_mm`` fuses."""
    out, start = [], 0
    for e, end in enumerate(offs.tolist()):
        out.append(x[start:end] @ w[e])
        start = end
    return torch.cat(out) if out else x.new_zeros((0, w.shape[-1]))


FORCE_GROUPED_KERNEL = False
"""Tests set this to run the grouped-kernel path on CPU (torch._grouped_mm runs there in fp32)."""


@contextmanager
def grouped_kernel_forced(force: bool = True) -> Iterator[None]:
    """Run the block with :data:`FORCE_GROUPED_KERNEL` set to ``force``; the previous value is restored after."""
    global FORCE_GROUPED_KERNEL
    previous, FORCE_GROUPED_KERNEL = FORCE_GROUPED_KERNEL, force
    try:
        yield
    finally:
        FORCE_GROUPED_KERNEL = previous


def use_grouped_kernel(x: torch.Tensor) -> bool:
    if FORCE_GROUPED_KERNEL:
        return True
    from dsft.kernels.grouped_mm import has_grouped_mm

    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and has_grouped_mm()


def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [S, K] (rows sorted by group) @ w [E, K, N] per group -> [S, N]."""
    if use_grouped_kernel(x):
        from dsft.kernels.grouped_mm import gmm

        return gmm(x, w, offs)
    return grouped_mm_reference(x, w, offs)


def grouped_mm_part(x: torch.Tensor, w: torch.Tensor, part: torch.Tensor, offs: torch.Tensor, where: str) -> torch.Tensor:
    """:func:`grouped_mm` where ``part`` of w [E, K, N] trains and the rest is frozen (see
    :data:`dsft.kernels.grouped_mm.PARTS`): ``head`` = w[:H] (same storage), ``rows`` = the values of w's last
    r input rows, ``cols`` = the values of its last r output columns."""
    if use_grouped_kernel(x):
        from dsft.kernels.grouped_mm import gmm_part

        return gmm_part(x, w, part, offs, where)
    if where == "head":
        return grouped_mm_reference(x, torch.cat([part, w[part.shape[0] :].detach()]), offs)
    dim = 1 if where == "rows" else 2
    return grouped_mm_reference(x, torch.cat([w.narrow(dim, 0, w.shape[dim] - part.shape[dim]).detach(), part], dim=dim), offs)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor, lora: LowRank | None,
                   head: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group ``x W_e^T (+ s (x A_e^T) B_e^T)`` for W [E, out, in]; with ``head`` (= W[:H], trained),
    the first H groups' weights get gradients and the others none."""
    if head is None:
        y = grouped_mm(x, weight.transpose(1, 2), offs)
    else:
        y = grouped_mm_part(x, weight.transpose(1, 2), head.transpose(1, 2), offs, "head")
    if lora is not None:
        h = grouped_mm(x, lora.A.transpose(1, 2).to(x.dtype), offs)          # [S, r]
        y = y + lora.scale * grouped_mm(h, lora.B.transpose(1, 2).to(x.dtype), offs)
    return y


TOKEN_SIDE_LORA = True
"""Compute gate_up's ``x A^T`` and down's ``h B^T`` on the tokens rather than on the routed pairs
(see :func:`experts_forward`); False: all four LoRA products as grouped GEMMs on the pairs."""


def _lora_in_from_tokens(x: torch.Tensor, lora: LowRank, r: Routing, k: int) -> torch.Tensor:
    """``x A_e^T`` for every routed pair [T*k, r], computed on the T tokens for all E experts in one dense
    GEMM (E*r columns, narrower than the hidden size), each pair then picking its expert's r columns.
    The grouped alternative reads the k-fold expanded rows, and its backward writes a [T*k, H] input
    gradient to add; this one's is [T, H]."""
    n_experts, rank, hidden = lora.A.shape
    h_all = x @ lora.A.reshape(n_experts * rank, hidden).to(x.dtype).T                  # [T, E*r]
    return h_all.view(-1, n_experts, rank)[r.order // k, r.expert]


def _gate_up(xp: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora: LowRank | None, r: Routing, k: int,
             head: torch.Tensor | None, folded: torch.Tensor | None) -> torch.Tensor:
    """The routed pairs' gate/up projection [T*k, 2I], LoRA included (see :func:`experts_forward`)."""
    if lora is None or not TOKEN_SIDE_LORA:
        return grouped_linear(xp, weight, r.offs, lora, head)
    h = _lora_in_from_tokens(x, lora, r, k)
    if folded is not None:
        # One grouped GEMM for W and B: [x | s h] against [W | B] (``folded``, whose first H columns are W itself).
        return grouped_mm_part(torch.cat([xp, lora.scale * h], dim=1), folded.transpose(1, 2),
                               lora.B.transpose(1, 2).to(x.dtype), r.offs, "rows")
    y = grouped_linear(xp, weight, r.offs, None, head)
    return y + lora.scale * grouped_mm(h, lora.B.transpose(1, 2).to(x.dtype), r.offs)


def _lora_out_to_tokens(h: torch.Tensor, lora: LowRank, r: Routing, k: int, n_tokens: int) -> torch.Tensor:
    """``sum_k s h_k B_e^T`` per token, h_k = w_k a_k A_e^T [T*k, r] (the routing weight already in): each pair's r
    values go into its expert's block of a [T, E*r] matrix (a token's k experts are distinct), then one dense GEMM
    with every B stacked; the output and its gradient are [T, H], not [T*k, H]."""
    n_experts, out_features, rank = lora.B.shape
    g = h.new_zeros(n_tokens, n_experts, rank).index_put((r.order // k, r.expert), h)
    stacked = lora.B.permute(0, 2, 1).reshape(n_experts * rank, out_features).to(h.dtype)   # row e*r+j = B_e[:, j]
    return lora.scale * (g.view(n_tokens, n_experts * rank) @ stacked)


def is_silu(act: object) -> bool:
    """Whether ``act`` is SiLU: ``F.silu``, ``nn.SiLU`` or transformers' ``SiLUActivation`` (what the SwiGLU paths
    of the training and runtime kernels assume)."""
    return act is F.silu or isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


class _SwigluDown(torch.autograd.Function):
    """``a = silu(gate) * up * weight`` then ``a @ w`` per expert, where w [E, I, H + r] is down_proj with its LoRA A
    folded into the last r output columns (``part`` holds those values and gets their gradient).

    Autograd through the two ops would keep ``a`` [pairs, I] for A's gradient beside ``gu`` [pairs, 2I], which the
    activation's backward needs anyway: here backward recomputes ``a`` from ``gu`` (pointwise), so a layer keeps
    ~17 KB a token less (DeepSeek-V2-Lite, bf16), which is room for more layers that skip the recompute."""

    @staticmethod
    def forward(ctx, gu: torch.Tensor, weight: torch.Tensor, w: torch.Tensor, part: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        from dsft.kernels.grouped_mm import gmm

        gate, up = gu.float().chunk(2, dim=-1)
        a = (F.silu(gate) * up * weight.float().unsqueeze(-1)).to(gu.dtype)
        ctx.save_for_backward(gu, weight, w, offs)
        ctx.rank = part.shape[-1]
        return gmm(a, w, offs)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        from dsft.kernels.grouped_mm import gmm, gmm_wgrad

        gu, weight, w, offs = ctx.saved_tensors
        gate, up = gu.float().chunk(2, dim=-1)
        sig = torch.sigmoid(gate)
        silu = gate * sig
        wcol = weight.float().unsqueeze(-1)
        dpart = gmm_wgrad((silu * up * wcol).to(gu.dtype), dy[:, dy.shape[1] - ctx.rank :], offs)
        da = gmm(dy, w.transpose(-1, -2), offs).float()
        d_silu_up = da * wcol
        dgate = d_silu_up * up * sig * (1 + gate * (1 - sig))
        dweight = (da * silu * up).sum(-1).to(weight.dtype)
        return torch.cat([dgate, d_silu_up * silu], dim=-1).to(gu.dtype), dweight, None, dpart, None


def _down(a: torch.Tensor, weight: torch.Tensor, lora: LowRank | None, r: Routing, head: torch.Tensor | None,
          folded: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The routed pairs' down projection [T*k, H] without LoRA, and (token-side LoRA) u = a A^T [T*k, r]."""
    if lora is None or not TOKEN_SIDE_LORA:
        return grouped_linear(a, weight, r.offs, lora, head), None
    if folded is not None:
        # One grouped GEMM for W and A: a against [W; A] (``folded``, whose first H rows are W itself).
        y = grouped_mm_part(a, folded.transpose(1, 2), lora.A.transpose(1, 2).to(a.dtype), r.offs, "cols")
        return y[:, : weight.shape[1]], y[:, weight.shape[1] :]
    return grouped_linear(a, weight, r.offs, None, head), grouped_mm(a, lora.A.transpose(1, 2).to(a.dtype), r.offs)


def experts_forward(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    gate_up_lora: LowRank | None = None,
    down_lora: LowRank | None = None,
    heads: tuple[torch.Tensor, torch.Tensor] | None = None,
    gate_up_folded: torch.Tensor | None = None,
    down_folded: torch.Tensor | None = None,
) -> torch.Tensor:
    """A routed-experts MLP with optional LoRA on both projections (transformers v5 layout:
    ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]). x: [T, H]; returns [T, H].

    ``heads``: (gate_up_proj[:S], down_proj[:S]) as trained parameters sharing the fused weights'
    storage (ESFT): only experts 0..S-1 get weight gradients.

    With :data:`TOKEN_SIDE_LORA`, the two LoRA products whose input or output is per token (gate_up's
    ``x A^T``, down's ``h B^T`` summed over the k choices) run on the T tokens, not the T*k pairs.
    ``gate_up_folded`` [E, 2I, H + r]: gate_up_proj with gate_up_lora's B appended along the input dim
    (:func:`dsft.adapters.fast_lora.fold_lora`), so that W and B share one grouped GEMM;
    ``down_folded`` [E, H + r, I]: down_proj with down_lora's A appended along the output dim, so that
    ``a W^T`` and ``a A^T`` come out of one grouped GEMM (and their input gradients out of another)."""
    k = top_k_index.shape[-1]
    r = route(top_k_index, top_k_weights, gate_up_proj.shape[0])
    gu_head, down_head = heads if heads is not None else (None, None)
    gu = _gate_up(permute(x, r, k), x, gate_up_proj, gate_up_lora, r, k, gu_head, gate_up_folded)
    # The routing weight scales the down projection's input, not its output (the same product: it is linear in
    # its input). The weight's gradient then needs the [T*k, I] activation (pointwise from gate/up, which backward
    # keeps anyway) instead of a saved [T*k, H] output (hidden H > expert width I).
    if (down_folded is not None and down_lora is not None and TOKEN_SIDE_LORA and is_silu(act)
            and use_grouped_kernel(gu)):
        y = _SwigluDown.apply(gu, r.weight, down_folded.transpose(1, 2), down_lora.A.transpose(1, 2).to(gu.dtype), r.offs)
        y, u = y[:, : down_proj.shape[1]], y[:, down_proj.shape[1] :]
    else:
        gate, up = gu.chunk(2, dim=-1)
        a = act(gate) * up * r.weight.unsqueeze(-1).to(up.dtype)
        y, u = _down(a, down_proj, down_lora, r, down_head, down_folded)
    out = unpermute(y, r, k)
    if u is not None and down_lora is not None:  # u is only made with a down LoRA
        out = out + _lora_out_to_tokens(u, down_lora, r, k, x.shape[0])
    return out.to(x.dtype)


def experts_forward_reference(x, top_k_index, top_k_weights, gate_up_proj, down_proj, act,
                              gate_up_lora: LowRank | None = None, down_lora: LowRank | None = None) -> torch.Tensor:
    """The same MLP the slow, obvious way: merge W + s B A per expert and loop over tokens' choices."""
    def merged(w, lora):
        return w if lora is None else w + lora.scale * torch.einsum("eor,eri->eoi", lora.B, lora.A).to(w.dtype)
    wgu, wd = merged(gate_up_proj, gate_up_lora), merged(down_proj, down_lora)
    out = torch.zeros_like(x)
    for slot in range(top_k_index.shape[-1]):
        for e in top_k_index[:, slot].unique().tolist():
            rows = (top_k_index[:, slot] == e).nonzero().squeeze(-1)
            g, u = (x[rows] @ wgu[e].T).chunk(2, dim=-1)
            out[rows] += (act(g) * u) @ wd[e].T * top_k_weights[rows, slot, None].to(x.dtype)
    return out
