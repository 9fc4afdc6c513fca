"""FLOP counts of the custom ops a training layer runs, for the compiler's memory budget.

Under ``activation_memory_budget`` < 1 (:data:`dsft.kernels.compile.KEPT_MEMORY_BUDGET`) the partitioner picks what
to recompute in backward by each op's cost, counted with ``torch.utils.flop_counter``. An op without a formula counts
as one FLOP: dsft's grouped GEMMs (``dsft::gmm`` & co.) and PyTorch's variable-length flash attention
(``torch_attn::_varlen_attn``, a custom op around the counted flash kernel) looked free to recompute, as cheap as a
pointwise op. On an H200 (lite shape, every layer kept) a budget of 0.6 recomputed the routed experts' gate/up GEMM
and ran 18% slower (``benchmarks/results/2026-12-02-h200-train-memory-budget.md``); counted, the partitioner spends
a lower budget on pointwise work first.
"""
from __future__ import annotations

from math import prod

import torch


def _gmm(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """x [S, K] @ w [G, K, N], each row through one group: 2 S K N."""
    return 2 * x_shape[0] * x_shape[1] * w_shape[-1]


def _gmm_wgrad(x_shape, dy_shape, *args, out_shape=None, **kwargs) -> int:
    """x^T dy per group over [S, K] and [S, N]: 2 S K N."""
    return 2 * x_shape[0] * x_shape[1] * dy_shape[1]


def _linear_part(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """x [..., K] W^T for W [N, K]: 2 (rows) K N."""
    return 2 * prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


def _varlen_attn(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """Causal attention over packed examples, q/k ``[tokens, heads, d]``, v ``[tokens, heads, dv]``. The examples'
    lengths are data (not seen here): priced as one example of ``max_q`` (the call's longest, an argument) per
    ``max_q`` tokens, half of the score matrix computed: 2 tokens max_q heads (d + dv) / 2."""
    tokens, heads, d = q_shape
    ints = [a for a in args if isinstance(a, int)]
    longest = ints[0] if ints else tokens
    return tokens * min(longest, tokens) * heads * (d + v_shape[-1])


def register_flop_formulas() -> None:
    """Register the formulas above for the ops this torch has (idempotent; one registered elsewhere stays)."""
    from torch.utils.flop_counter import flop_registry, register_flop_formula

    import dsft.kernels.grouped_mm  # noqa: F401 - defines dsft::gmm, dsft::gmm_wgrad, dsft::gmm_part
    import dsft.kernels.linear_part  # noqa: F401 - defines dsft::linear_part

    formulas = [("dsft", "gmm", _gmm), ("dsft", "gmm_part", _gmm), ("dsft", "gmm_wgrad", _gmm_wgrad),
                ("dsft", "linear_part", _linear_part), ("torch_attn", "_varlen_attn", _varlen_attn)]
    for namespace, name, formula in formulas:
        try:
            op = getattr(getattr(torch.ops, namespace), name)
        except (AttributeError, RuntimeError):
            continue  # e.g. a torch without variable-length attention
        if op not in flop_registry:
            register_flop_formula(op)(formula)
