"""A grouped GEMM for few rows per expert (decode steps): one Triton program per (expert, column block).

``y[p] = x[p] @ w[e(p)]`` for pairs sorted by expert (``offs``: the end of each expert's run), as
``torch._grouped_mm`` computes it. At decode sizes the step reads each used expert's weight once and does
almost no arithmetic, so what counts is how close the kernel streams those weights to the card's bandwidth:
torch's CUTLASS grouped kernel streams 1.4-3.0 TB/s of the H200's ~4.3 (lite shape, 1 to 128 rows), this one
3.1-4.4 TB/s (``benchmarks/results/2026-12-01-h200-moe-gemm-stop19-final.md``). Each program owns one expert's
``BLOCK_N`` output columns and loops over that expert's rows in ``BLOCK_M`` blocks (one block at decode sizes, so
each weight tile is read once) and over K; programs of experts without rows return at once. The kernel itself is
in :mod:`dsft.kernels.moe_gemm_triton`.

:func:`moe_gemm` is for inference (no autograd); :func:`usable` says when it applies. The CPU tests run the
kernel in Triton's interpreter (``TRITON_INTERPRET=1``) against :func:`dsft.kernels.expert_lora.grouped_mm_reference`.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("dsft.kernels")

MAX_PAIRS = 768
"""Up to this many (token, expert) pairs the Triton kernel runs: 128 decode rows at 6 experts a token, the largest
size measured (H200, lite shape, ``benchmarks/moe_gemm_bench.py``: 1.3-2.1x faster than torch's grouped GEMM from
1 to 128 rows). Above it rows per expert grow (a prefill), each weight tile is read once per ``BLOCK_M`` rows, and
CUTLASS's larger tiles are the better choice (not measured)."""


def _load_kernel():
    try:
        from dsft.kernels import moe_gemm_triton
    except Exception:  # Triton not installed (CPU wheels of torch do not bring it), or broken
        return None
    return moe_gemm_triton.moe_gemm_kernel


# Imported only where it can run (0.5 s of imports a CPU process has no use for): a CUDA build of torch brings
# Triton, the CPU tests install it for its interpreter (TRITON_INTERPRET=1).
_KERNEL = _load_kernel() if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" else None


_FAILED: str | None = None
"""Why the kernel was turned off in this process (it failed to compile for this GPU, e.g. one without bf16
tensor cores), if it was."""


def available() -> bool:
    """Triton's kernel loaded (on a machine with CUDA, or under the interpreter) and not turned off."""
    return _KERNEL is not None and _FAILED is None


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`moe_gemm` should (and can) run for these operands: half precision on CUDA, few pairs, Triton present,
    unless ``DSFT_TRITON_MOE=0`` (to compare against torch's grouped GEMM)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype
            and x.shape[0] <= MAX_PAIRS and os.environ.get("DSFT_TRITON_MOE", "1") != "0" and available())


def config(K: int) -> dict[str, int]:
    """Tile sizes for a reduction of ``K``: the experts' own weights (K = hidden or intermediate size) take a
    configuration within 3% of the best of the sweep at every decode size measured on the H200; a LoRA up-projection
    (K = the stacked ranks, 16-64) reads one short tile per program, so programs take wider column blocks (within
    10-20% of the sweep's best, 3-6x faster than torch's grouped GEMM: ``moe_gemm_bench.py``)."""
    if K <= 64:
        return {"block_n": 256, "block_k": max(16, 1 << (K - 1).bit_length()), "num_warps": 4, "num_stages": 2}
    return {"block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4}


def moe_gemm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, *, block_n: int | None = None,
             block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None) -> torch.Tensor:
    """``x`` [P, K] (pairs sorted by expert) times ``w`` [E, K, N] per expert, ``offs`` [E] int32 run ends
    (``offs[-1] == P``) -> [P, N] in x's dtype. Any strides (e.g. ``w`` a transposed view of [E, N, K]).
    Tiles default to :func:`config`."""
    P, K = x.shape
    E, _, N = w.shape
    y = x.new_empty((P, N))
    if P == 0:
        return y
    if _KERNEL is None:
        raise RuntimeError("the Triton MoE kernel needs Triton on a CUDA machine (or TRITON_INTERPRET=1); see usable()")
    tiles = config(K)
    bn, bk = block_n or tiles["block_n"], block_k or tiles["block_k"]
    _KERNEL[(E, -(-N // bn))](x, w, y, offs, N, K, x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
                              y.stride(0), y.stride(1), BLOCK_M=16, BLOCK_N=bn, BLOCK_K=bk,
                              num_warps=num_warps or tiles["num_warps"], num_stages=num_stages or tiles["num_stages"])
    return y


def moe_gemm_or_none(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor | None:
    """:func:`moe_gemm`, or None (the caller's own path) when it cannot compile for this GPU: it is then turned off
    for the process, with a warning, instead of failing every step. A compilation happens at the first call of each
    shape, which the runtime makes eagerly before it captures a CUDA graph."""
    global _FAILED
    try:
        return moe_gemm(x, w, offs)
    except Exception as exc:  # triton's CompilationError, an unsupported dtype on an older GPU, ...
        if _FAILED is None:
            _FAILED = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("the Triton MoE kernel is off (torch's grouped GEMM instead): %s", _FAILED)
        return None
