"""Routed experts where each token may use its own adapter's LoRA: the runtime's MoE forward.

The base experts run once for all (token, expert) pairs with grouped GEMMs; each pair adds its adapter's
low-rank term (the stacked factors of every adapter in the batch, a column mask keeping the pair's own
rank block) before the activation (``gate_up_proj``) and after it (``down_proj``): the math of merging
W + s B A per adapter, without forming it. Grouped GEMMs call the kernel directly (the custom
op in :mod:`dsft.kernels.grouped_mm` exists for autograd and ``torch.compile``, and its dispatch costs more
than the GEMM at decode sizes). On a GPU in half precision, up to 768 pairs, the whole forward runs in six Triton
kernels (:func:`_in_kernels`: the sort of the pairs, each projection's GEMM with the glue around it folded in, the
weighted sum back to tokens); the torch path below is the CPU's and the reference. See
:mod:`dsft.runtime.multilora` for the tables and the wiring.
"""
from __future__ import annotations

import os

import torch

from dsft.kernels import moe_gemm
from dsft.kernels.expert_lora import LowRank, grouped_mm_reference, is_silu
from dsft.kernels.fp8 import dequantize
from dsft.kernels.grouped_mm import grouped_mm_kernel, has_grouped_mm
from dsft.runtime.fused_linear import Fused


def _gmm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [S, K] (rows sorted by group) @ w [E, K, N] per group, for inference: decode sizes through dsft's Triton
    kernel (:mod:`dsft.kernels.moe_gemm`), larger ones through torch's grouped GEMM."""
    if moe_gemm.usable(x, w):
        y = moe_gemm.moe_gemm_or_none(x, w, offs)
        if y is not None:
            return y
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and has_grouped_mm():
        if w.stride(-1) != 1 and w.stride(-2) != 1:
            w = w.contiguous()
        return grouped_mm_kernel(x.contiguous(), w, offs)
    return grouped_mm_reference(x, w, offs)


FP8_FUSED_A_ENV = "DSFT_FP8_FUSED_A"
"""``0`` runs FP8 experts' base product and the adapters' A as two launches (one by default, :func:`_kernel_projection`)."""

FEW_PAIRS = 64
"""Up to this many (token, expert) pairs (a decode step of up to 10 rows at 6 experts a token), the LoRA products
gather each pair's factors and run as batched GEMMs instead of grouped ones over every expert, which are
launch-bound at decode sizes (H200, lite shape: the step's grouped GEMMs averaged 16 us a call at 1 row).
Measured on the H200 (decode_profile, same call): 9.0 -> 8.6 ms a step at 1 row, 16.6 -> 15.4 at 8 rows.
Above it, gathering copies more factor bytes than the grouped GEMMs read (not measured: 32 rows ran grouped).
Only where torch's grouped GEMM would run: :mod:`dsft.kernels.moe_gemm` reads each pair's factors in place."""


def _route(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, n_experts: int):
    """(token, routing weight and expert of each pair, end offset of each expert's run), pairs sorted by expert."""
    expert = top_k_index.reshape(-1)
    order = torch.argsort(expert, stable=True)
    # histc, not bincount: a fixed output size, no host sync on GPU.
    counts = torch.histc(expert.float(), bins=n_experts, min=0, max=n_experts - 1)
    return (order // top_k_index.shape[-1], top_k_weights.reshape(-1)[order], expert[order],
            torch.cumsum(counts, 0).to(torch.int32))


def _product(v: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
    """``v w_e^T`` for each pair (row of v) and its expert e, w [E, N, K]."""
    if v.shape[0] <= FEW_PAIRS and not moe_gemm.usable(v, w):  # gathered whole (contiguous copies), transposed as a view
        return torch.bmm(v.unsqueeze(1), w.index_select(0, expert).transpose(1, 2)).squeeze(1)
    return _gmm(v, w.transpose(1, 2), offs)


def _lora_up(h: torch.Tensor, f: LowRank, offs: torch.Tensor, expert: torch.Tensor,
             mask: torch.Tensor | None) -> torch.Tensor:
    """``(h * mask) B_e^T s`` for each pair, ``h = x A_e^T``."""
    if mask is not None:
        h = h * mask
    out = _product(h, f.B, offs, expert)
    return out if f.scale == 1.0 else out * f.scale


def _project(x: torch.Tensor, w: torch.Tensor, lora: tuple[LowRank, torch.Tensor | None] | None,
             fused: Fused | None, offs: torch.Tensor, expert: torch.Tensor, pairs) -> torch.Tensor:
    """``x W_e^T`` plus the pair's LoRA for each pair; with ``fused`` (``[W; A]`` per expert) ``x A_e^T`` comes out
    of the base experts' grouped GEMM."""
    if lora is None:
        return _gmm(x, w.transpose(1, 2), offs)
    f, mask = lora
    if fused is not None:
        full = _gmm(x, fused.stacked.transpose(1, 2), offs)
        y, h = full[:, : fused.out_features], full[:, fused.out_features :]
    else:
        y, h = _gmm(x, w.transpose(1, 2), offs), _product(x, f.A, offs, expert)
    return y + _lora_up(h, f, offs, expert, pairs(mask)).to(y.dtype)


def experts_forward_mixed(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act,
    gate_up: tuple[LowRank, torch.Tensor | None] | None = None,
    down: tuple[LowRank, torch.Tensor | None] | None = None,
    fused: tuple[Fused | None, Fused | None] = (None, None),
    scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> torch.Tensor:
    """Routed experts (transformers v5 layout: ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) where
    each token may use its own LoRA.

    Args:
        x: tokens [T, H]; top_k_index, top_k_weights: the router's choices [T, k].
        gate_up, down: ``(stacked factors, token column mask [T, R] or None = every column for every token)``
            (see :func:`dsft.runtime.multilora.stack_experts`), or None for no LoRA on that projection.
        fused: per projection, the base weight with that projection's stacked A under each expert's rows
            (:class:`dsft.runtime.fused_linear.FusedWeights`), or None.
        scales: per projection, the row scales of FP8 expert weights (:mod:`dsft.kernels.fp8`), or None for
            weights in the model's dtype. dsft's kernels read FP8 tiles as they are, for decode steps and
            prefills up to :func:`dsft.kernels.moe_gemm.max_pairs` pairs; larger steps widen the layer's experts first.
    Returns:
        [T, H], equal per token to :func:`dsft.kernels.expert_lora.experts_forward_reference` with that
        token's adapter alone.
    """
    if moe_gemm.usable(x, gate_up_proj) and top_k_index.numel() <= moe_gemm.max_pairs(gate_up_proj) and is_silu(act):
        y = moe_gemm.or_none(_in_kernels, x, top_k_index, top_k_weights, gate_up_proj, down_proj, gate_up, down, fused,
                             scales)
        if y is not None:
            return y
    if scales[0] is not None:
        gate_up_proj = dequantize(gate_up_proj, scales[0], x.dtype)
    if scales[1] is not None:
        down_proj = dequantize(down_proj, scales[1], x.dtype)
    token, weight, expert, offs = _route(top_k_index, top_k_weights, gate_up_proj.shape[0])
    pair_masks: dict[int, torch.Tensor] = {}  # both projections usually share one token mask: gather it once

    def pairs(mask: torch.Tensor | None) -> torch.Tensor | None:
        if mask is None:
            return None
        if id(mask) not in pair_masks:
            pair_masks[id(mask)] = mask[token]
        return pair_masks[id(mask)]

    h = _project(x[token], gate_up_proj, gate_up, fused[0], offs, expert, pairs)
    g, u = h.chunk(2, dim=-1)
    y = _project(act(g) * u, down_proj, down, fused[1], offs, expert, pairs)
    y = y * weight.unsqueeze(-1).to(y.dtype)
    return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


def _in_kernels(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, gate_up_proj: torch.Tensor,
                down_proj: torch.Tensor, gate_up: tuple[LowRank, torch.Tensor | None] | None,
                down: tuple[LowRank, torch.Tensor | None] | None, fused: tuple[Fused | None, Fused | None],
                scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)) -> torch.Tensor:
    """:func:`experts_forward_mixed` for a decode step in six Triton kernels (:mod:`dsft.kernels.moe_gemm`): sort
    the pairs; ``[W; A]`` of gate_up on the tokens' rows in place; the LoRA up-projection with the pairs' rank
    mask, added to the base output, through SwiGLU; the same for down (without the activation); the weighted sum
    back to tokens. A projection's LoRA must have its A under W (``fused``), as it does whenever the batch holds
    every attached adapter (always in a CUDA graph); otherwise the base GEMM and torch's glue run apart."""
    routed = moe_gemm.route(top_k_index, gate_up_proj.shape[0])
    h = _kernel_projection(x, gate_up_proj, gate_up, fused[0], routed, gather=True, glu=True, scale=scales[0])
    y = _kernel_projection(h, down_proj, down, fused[1], routed, gather=False, glu=False, scale=scales[1])
    return moe_gemm.combine(y, routed.pos, top_k_weights, x.dtype)


def _kernel_projection(x: torch.Tensor, w: torch.Tensor, lora: tuple[LowRank, torch.Tensor | None] | None,
                       fused: Fused | None, routed: moe_gemm.Routed, *, gather: bool, glu: bool,
                       scale: torch.Tensor | None = None) -> torch.Tensor:
    """One projection of :func:`_in_kernels`: ``x W_e^T`` (+ the pair's LoRA), through SwiGLU with ``glu``; ``scale``:
    W's FP8 row scales (W and the adapters' A then never share a buffer: A stays in the model's dtype)."""
    tok, offs = routed.token, routed.offs
    if lora is None:
        return moe_gemm.moe_gemm(x, w.transpose(1, 2), offs, tok=tok, gather=gather, glu=glu, scale=scale)
    f, mask = lora
    if fused is None and scale is not None and os.environ.get(FP8_FUSED_A_ENV, "1") != "0":
        # FP8 W and the adapters' A (model dtype) in one launch, A's few columns beside W's: 32 mixed requests
        # 4,338 -> 4,577 tokens/s on the H200 (2026-12-02-NVIDIA-H200-runtime-fp8-experts.md)
        full = moe_gemm.moe_gemm(x, w.transpose(1, 2), offs, tok=tok, gather=gather, scale=scale,
                                 second=f.A.transpose(1, 2))
        base, h = full[:, : w.shape[1]], full[:, w.shape[1] :]
    elif fused is None:
        base = moe_gemm.moe_gemm(x, w.transpose(1, 2), offs, tok=tok, gather=gather, scale=scale)
        h = moe_gemm.moe_gemm(x, f.A.transpose(1, 2), offs, tok=tok, gather=gather)
    else:
        full = moe_gemm.moe_gemm(x, fused.stacked.transpose(1, 2), offs, tok=tok, gather=gather)
        base, h = full[:, : fused.out_features], full[:, fused.out_features :]
    if f.scale != 1.0:  # stacked factors carry their scale in B
        h = h * f.scale
    return moe_gemm.moe_gemm(h, f.B.transpose(1, 2), offs, tok=tok, mask=mask, add=base, glu=glu)
