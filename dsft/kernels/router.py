"""DeepSeek-V2's greedy router (softmax over the experts, the top k, times the routed scaling factor) in two kernels.

transformers computes it as casts of the tokens and the router weight to fp32, an fp32 GEMM, a softmax, a top-k (two
kernels) and a product: six or seven kernels a layer, of which the GEMM (a SIMT kernel at decode sizes) and the
top-k take ~6 us each on an H200 (``benchmarks/results/2026-12-01-h200-decode-kernels.md``). Here: the logits with
the router weight spread over programs (experts x hidden blocks), then the sum, softmax and top k. (A first version
in one kernel, one program per 16 tokens streaming the whole weight, made a decode step slower:
``-decode-router-ab.md``.)

On by default (``DSFT_TRITON_ROUTER=0`` turns it off) up to :data:`MAX_TOKENS` tokens: on an H200 a decode step of
1 row went 4.99 -> 4.78 ms and of 32 rows 11.90 -> 11.72 ms; at 128 rows it was 1% slower (14.41 -> 14.56 ms), so
larger steps keep transformers' ops (``benchmarks/results/2026-12-02-h200-decode-router.md``). The chosen experts come in
descending probability, ties to the lowest expert (transformers asks ``topk`` for no order; the weighted sum over
them does not depend on it). :func:`greedy_route_reference` is transformers' math (the tests' oracle, the kernels
running in Triton's interpreter there).
"""
from __future__ import annotations

import os

import torch

from dsft.kernels import moe_gemm

MAX_TOKENS = 64
"""Tokens up to which the kernels run (a small decode step's; larger steps and prefills keep transformers' ops)."""
SPAN = 256
"""Hidden columns a logits program sums over."""


def wanted() -> bool:
    """Triton available and not ``DSFT_TRITON_ROUTER=0``: the runtime patches its routers (see the module's docstring)."""
    return os.environ.get("DSFT_TRITON_ROUTER") != "0" and moe_gemm.available()


def usable(x: torch.Tensor, n_experts: int) -> bool:
    """CUDA in half precision (or the interpreter), few tokens, at most 256 experts, Triton available."""
    return (moe_gemm.runs_on(x) and x.numel() // x.shape[-1] <= MAX_TOKENS and n_experts <= 256)


def greedy_route(x: torch.Tensor, weight: torch.Tensor, k: int, scale: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` [T, H], router ``weight`` [E, H] -> (logits [T, E] fp32, weights [T, k] fp32, experts [T, k] int64)."""
    moe_gemm.require("router kernels")
    from dsft.kernels import router_triton

    T, H = x.shape
    E = weight.shape[0]
    logits = torch.empty((T, E), dtype=torch.float32, device=x.device)
    weights = torch.empty((T, k), dtype=torch.float32, device=x.device)
    index = torch.empty((T, k), dtype=torch.int64, device=x.device)
    if T == 0:
        return logits, weights, index
    n_split = -(-H // SPAN)
    partial = torch.empty((n_split, T, E), dtype=torch.float32, device=x.device)
    block_t = max(16, min(64, 1 << (T - 1).bit_length()))
    router_triton.router_logits_kernel[(-(-E // 16), n_split)](
        x, weight, partial, T, H, E, SPAN, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        BLOCK_T=block_t, BLOCK_E=16, BLOCK_H=64)
    router_triton.router_topk_kernel[(-(-T // 16),)](
        partial, logits, weights, index, T, E, n_split, scale, K=k, BLOCK_T=16, BLOCK_E=max(16, 1 << (E - 1).bit_length()))
    return logits, weights, index


def greedy_route_reference(x: torch.Tensor, weight: torch.Tensor, k: int, scale: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' DeepSeek-V2 greedy router, top k sorted by probability."""
    logits = torch.nn.functional.linear(x.float(), weight.float())
    weights, index = torch.topk(logits.softmax(dim=-1, dtype=torch.float32), k=k, dim=-1)
    return logits, weights * scale, index
