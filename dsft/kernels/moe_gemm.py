"""A grouped GEMM for few rows per expert (decode steps): one Triton program per (expert, column block).

``y[p] = x[p] @ w[e(p)]`` for pairs sorted by expert (``offs``: the end of each expert's run), as
``torch._grouped_mm`` computes it. At decode sizes the step reads each used expert's weight once and does
almost no arithmetic, so what counts is how close the kernel streams those weights to the card's bandwidth:
torch's CUTLASS grouped kernel streams 1.4-3.0 TB/s of the H200's ~4.3 (lite shape, 1 to 128 rows), this one
3.1-4.4 TB/s (``benchmarks/results/2026-12-01-h200-moe-gemm-stop19-final.md``). Each program owns one expert's
``BLOCK_N`` output columns and loops over that expert's rows in ``BLOCK_M`` blocks (one block at decode sizes, so
each weight tile is read once) and over K; programs of experts without rows return at once. Options fold the
glue around a routed-experts GEMM into it: reading the tokens' rows in place (no gathered copy), a LoRA rank mask,
an addend (the base output a LoRA up-projection adds to) and the SwiGLU activation.

:func:`route` (the pairs sorted by expert) and :func:`combine` (the weighted sum back to tokens) are the two ends
of a decode step's routed experts, one kernel each where torch takes eight (a radix sort, a histogram, gathers,
a cumulative sum, casts) and four. The kernels are in :mod:`dsft.kernels.moe_triton`.

Everything here is for inference (no autograd); :func:`usable` says when it applies. The CPU tests run the
kernels in Triton's interpreter (``TRITON_INTERPRET=1``) against plain torch.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch

from dsft.kernels.fp8 import FP8

log = logging.getLogger("dsft.kernels")
T = TypeVar("T")

MAX_PAIRS = 768
"""Up to this many (token, expert) pairs the Triton kernel runs: 128 decode rows at 6 experts a token, the largest
size measured (H200, lite shape, ``benchmarks/moe_gemm_bench.py``: 1.3-2.1x faster than torch's grouped GEMM from
1 to 128 rows). Above it rows per expert grow (a prefill), each weight tile is read once per ``BLOCK_M`` rows, and
CUTLASS's larger tiles are the better choice (not measured)."""


FP8_INPLACE_PAIRS = 8192
"""Pairs up to which FP8 expert weights go through the kernel, read in place: a prefill of up to ~1,365 tokens at
6 experts a token. Measured on the H200 (lite shape, ``moe_gemm_bench.py --prefill``,
``benchmarks/results/2026-12-02-NVIDIA-H200-moe-gemm-fp8-prefill.md``): widening the layer's experts to bf16 and
torch's grouped GEMM take ~520 us (gate_up) whatever the size, the kernel in place 121 us at 384 pairs and 286 us
at 6,144 (1.8x); past ~10,000 pairs the widen's fixed cost wins (extrapolated from the sweep, not measured)."""

FP8_PAIRS_ENV = "DSFT_FP8_INPLACE_PAIRS"
"""Overrides :data:`FP8_INPLACE_PAIRS` (``0`` widens every prefill, as before 2026-12-02)."""


def max_pairs(w: torch.Tensor) -> int:
    """Pairs up to which :func:`moe_gemm` runs for expert weights ``w``: :data:`MAX_PAIRS` for bf16 weights; for FP8
    weights :data:`FP8_INPLACE_PAIRS` (``DSFT_FP8_INPLACE_PAIRS=N`` to change it): a prefill up to that size reads
    the e4m3 weights in place instead of widening the layer's experts to bf16 first (~2.8 GB of traffic a lite-shape
    layer against the 0.55 GB read once)."""
    if w.dtype == FP8:
        raw = os.environ.get(FP8_PAIRS_ENV, "")
        return max(MAX_PAIRS, int(raw) if raw.isdigit() else FP8_INPLACE_PAIRS)
    return MAX_PAIRS


def _load_kernels():
    try:
        from dsft.kernels import moe_triton
    except Exception:  # Triton not installed (CPU wheels of torch do not bring it), or broken
        return None
    return moe_triton


# Imported only where it can run (0.5 s of imports a CPU process has no use for): a CUDA build of torch brings
# Triton, the CPU tests install it for its interpreter (TRITON_INTERPRET=1).
_KERNELS = _load_kernels() if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1" else None


_FAILED: str | None = None
"""Why the kernel was turned off in this process (it failed to compile for this GPU, e.g. one without bf16
tensor cores), if it was."""


def available() -> bool:
    """Triton's kernel loaded (on a machine with CUDA, or under the interpreter) and not turned off."""
    return _KERNELS is not None and _FAILED is None


def runs_on(t: torch.Tensor, half: bool = True) -> bool:
    """Whether dsft's Triton kernels can take ``t``: on CUDA (in half precision, unless ``half=False``) or in Triton's
    interpreter (``TRITON_INTERPRET=1``: the CPU tests), with the kernels loaded and not turned off."""
    here = (t.is_cuda and (not half or t.dtype in (torch.bfloat16, torch.float16))
            or os.environ.get("TRITON_INTERPRET") == "1")
    return here and available()


def require(what: str) -> None:
    """Raise unless the Triton kernels are loaded (``what`` names the caller's kernels in the message)."""
    if not available():
        raise RuntimeError(f"the Triton {what} need Triton on a CUDA machine (or TRITON_INTERPRET=1); see usable()")


def usable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`moe_gemm` should (and can) run for these operands: half precision on CUDA (weights in x's dtype
    or FP8), few pairs, Triton present, unless ``DSFT_TRITON_MOE=0`` (to compare against torch's grouped GEMM)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.dtype in (x.dtype, FP8)
            and x.shape[0] <= max_pairs(w) and os.environ.get("DSFT_TRITON_MOE", "1") != "0" and available())


FP8_DOTS = ("bf16", "f16", "fp8")


def fp8_dot() -> str:
    """How :func:`moe_gemm` multiplies FP8 expert weights (``DSFT_FP8_DOT``): ``bf16`` (the default) widens them to
    x's dtype; ``f16`` to fp16 (one conversion instruction per two values on Hopper, x rounded to fp16); ``fp8``
    quantises each row of x to e4m3 with its own scale and runs the products on FP8 tensor cores (no widening at
    all; x's rounding to e4m3 adds to the weights' own). At decode sizes the widening, not the memory, bounds the
    FP8 GEMM (3.0 TB/s where bf16 weights stream at 3.9-4.3: ``-moe-gemm-fp8.md``); neither alternative is measured
    on a GPU yet, hence not the default."""
    dot = os.environ.get("DSFT_FP8_DOT", "bf16")
    return dot if dot in FP8_DOTS else "bf16"


FP8_FEW_PAIRS = 8
"""Pairs up to which FP8 weights take narrower, deeper tiles (:func:`config`): one decode row is 6 (top-6)."""


GLU_WARPS = 4
"""Warps of the SwiGLU variants (gate and up accumulators both live). Compiled for sm_90 at 4 warps the LoRA
up-projection with SwiGLU (the decode tiles, 16 x 256) spills 488 bytes of registers a thread to local memory,
the FP8 gate_up with SwiGLU 88; at 8 warps neither spills (``tests/kernels/test_triton_compile.py`` compiles them;
``cuobjdump -res-usage``). Measured on the H200 the spill costs nothing visible: the whole routed block 49.7 /
181.8 / 282.0 / 366.0 us at 1 / 8 / 32 / 128 rows with 4 warps, 48.0 / 182.2 / 281.9 / 367.4 with 8
(``moe_gemm_bench.py --block --glu-warps 4 8``, ``benchmarks/results/2026-12-02-NVIDIA-H200-moe-block.json``)."""


def config(K: int, fp8: bool = False, pairs: int | None = None, glu: bool = False) -> dict[str, int]:
    """Tile sizes for a reduction of ``K``: the experts' own weights (K = hidden or intermediate size) take a
    configuration within 3% of the best of the sweep at every decode size measured on the H200; a LoRA up-projection
    (K = the stacked ranks, 16-64) reads one short tile per program, so programs take wider column blocks (within
    10-20% of the sweep's best, 3-6x faster than torch's grouped GEMM: ``moe_gemm_bench.py``). FP8 weights with at
    most :data:`FP8_FEW_PAIRS` pairs (one decode row) take 32 columns x 256 of K: the sweep's best there, where the
    default was 24-25% slower (gate_up 26.3 -> 20.0 us, down 17.7 -> 13.2;
    ``benchmarks/results/2026-12-01-h200-moe-gemm-fp8.md``); from 32 rows up the default is within 3% of it.
    Past :data:`MAX_PAIRS` (FP8 prefills read in place, :func:`max_pairs`) the row blocks grow with the pairs: the
    best of the prefill sweep at 1,020 / 3,072 / 6,144 pairs (1.15-1.6x the 64-row guess used before it).
    ``glu``: the SwiGLU variant, run with :data:`GLU_WARPS` warps."""
    tiles = _tiles(K, fp8, pairs)
    return {**tiles, "num_warps": GLU_WARPS} if glu else tiles


def _tiles(K: int, fp8: bool, pairs: int | None) -> dict[str, int]:
    prefill = pairs is not None and pairs > MAX_PAIRS
    if K <= 64:
        return {"block_m": 64 if prefill else 16, "block_n": 128 if prefill else 256,
                "block_k": max(16, 1 << (K - 1).bit_length()), "num_warps": 4, "num_stages": 2}
    if prefill:
        assert pairs is not None
        if pairs <= 2 * MAX_PAIRS:
            return {"block_m": 32, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 3}
        if pairs <= 4096:
            return {"block_m": 64, "block_n": 128, "block_k": 128, "num_warps": 4, "num_stages": 3}
        return {"block_m": 128, "block_n": 64, "block_k": 64, "num_warps": 4, "num_stages": 3}
    if fp8 and pairs is not None and pairs <= FP8_FEW_PAIRS:
        return {"block_m": 16, "block_n": 32, "block_k": 256, "num_warps": 4, "num_stages": 3}
    return {"block_m": 16, "block_n": 64, "block_k": 128, "num_warps": 4, "num_stages": 4}


def moe_gemm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, *, tok: torch.Tensor | None = None,
             gather: bool = False, mask: torch.Tensor | None = None, add: torch.Tensor | None = None, glu: bool = False,
             scale: torch.Tensor | None = None, second: torch.Tensor | None = None, block_m: int | None = None,
             block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
             num_stages: int | None = None) -> torch.Tensor:
    """``x`` [P, K] (pairs sorted by expert) times ``w`` [E, K, N] per expert, ``offs`` [E] int32 run ends
    (``offs[-1] == P``) -> [P, N] in x's dtype. Any strides (e.g. ``w`` a transposed view of [E, N, K]).

    Options: with ``gather``, pair p's row is ``x[tok[p]]`` (x holds the tokens, P = ``len(tok)``); ``mask`` [T, K]
    multiplies pair p's row by ``mask[tok[p]]``; ``add`` [P, N] (``[P, 2N]`` with ``glu``) is added to the product;
    with ``glu``, ``w`` holds gate then up columns ([E, K, 2N]) and the result is ``silu(gate) * up`` [P, N];
    ``scale`` [E, N] (``[E, 2N]`` with ``glu``): ``w`` is FP8 and column n of expert e's product is multiplied by
    ``scale[e, n]`` (:mod:`dsft.kernels.fp8`); ``second`` [E, K, R] (with ``scale``, without the other options): a
    weight in x's dtype whose product fills columns N .. N + R of the result ([P, N + R]) in the same launch (an
    FP8 expert's adapters' stacked A beside its base product). Tiles default to :func:`config`."""
    if _KERNELS is None:
        raise RuntimeError("the Triton MoE kernel needs Triton on a CUDA machine (or TRITON_INTERPRET=1); see usable()")
    if (gather or mask is not None) and tok is None:
        raise ValueError("moe_gemm: gather and mask need tok, the token of each pair")
    if second is not None and (scale is None or glu or mask is not None or add is not None):
        raise ValueError("moe_gemm: a second weight goes with FP8 weights and none of glu, mask, add")
    P = tok.shape[0] if gather and tok is not None else x.shape[0]
    K = x.shape[1]
    E, N = w.shape[0], w.shape[2] // 2 if glu else w.shape[2]
    R = second.shape[2] if second is not None else 0
    y = x.new_empty((P, N + R))
    if P == 0:
        return y
    tiles = config(K, fp8=w.dtype == FP8, pairs=P, glu=glu)
    bn, bk = block_n or tiles["block_n"], block_k or tiles["block_k"]
    if (scale is not None) != (w.dtype == FP8):
        raise ValueError("moe_gemm: FP8 weights need their scale, and a scale needs FP8 weights")
    tok_, mask_, add_, scale_ = (t if t is not None else y for t in (tok, mask, add, scale))  # unused: any tensor
    v = second if second is not None else w
    _KERNELS.moe_gemm_kernel[(E, -(-N // bn) + -(-R // bn))](
        x, w, y, offs, tok_, mask_, add_, scale_, v, N, K, R, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
        w.stride(2), y.stride(0), y.stride(1), mask_.stride(0), mask_.stride(1), add_.stride(0), add_.stride(1),
        scale_.stride(0), scale_.stride(1), v.stride(0), v.stride(1), v.stride(2),
        GATHER=gather, MASK=mask is not None, ADD=add is not None, GLU=glu, SCALE=scale is not None,
        SECOND=second is not None,
        F16=scale is not None and fp8_dot() == "f16", A8=scale is not None and mask is None and fp8_dot() == "fp8",
        BLOCK_M=block_m or tiles["block_m"], BLOCK_N=bn, BLOCK_K=bk,
        num_warps=num_warps or tiles["num_warps"], num_stages=num_stages or tiles["num_stages"])
    return y


class Routed(NamedTuple):
    """The (token, expert) pairs of a step sorted by expert (stable): pair i of the sorted order is token
    ``token[i]``'s choice of expert ``expert[i]``; ``offs`` [E] int32: the end of each expert's run; ``pos`` [T * k]
    int32: where flat pair ``t * k + j`` went."""

    token: torch.Tensor
    expert: torch.Tensor
    offs: torch.Tensor
    pos: torch.Tensor


def route(top_k_index: torch.Tensor, n_experts: int) -> Routed:
    """Sort the router's choices ``top_k_index`` [T, k] by expert in one kernel (what ``argsort(stable=True)``,
    ``histc`` and ``cumsum`` give in torch)."""
    if _KERNELS is None:
        raise RuntimeError("the Triton MoE kernels need Triton on a CUDA machine (or TRITON_INTERPRET=1); see usable()")
    ids = top_k_index.reshape(-1).contiguous()
    P, k = ids.shape[0], top_k_index.shape[-1]
    token, expert = torch.empty(P, dtype=torch.int64, device=ids.device), torch.empty(P, dtype=torch.int64, device=ids.device)
    offs = torch.empty(n_experts, dtype=torch.int32, device=ids.device)
    pos = torch.empty(P, dtype=torch.int32, device=ids.device)
    block, block_e = 64, 64
    grid = (-(-P // block) + -(-n_experts // block_e),)
    _KERNELS.moe_route_kernel[grid](ids, token, expert, offs, pos, P, n_experts, k, BLOCK=block, BLOCK_E=block_e)
    return Routed(token, expert, offs, pos)


def combine(y: torch.Tensor, pos: torch.Tensor, top_k_weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[t] = sum_j top_k_weights[t, j] * y[pos[t * k + j]]`` [T, N] in ``dtype``, summed in fp32."""
    if _KERNELS is None:
        raise RuntimeError("the Triton MoE kernels need Triton on a CUDA machine (or TRITON_INTERPRET=1); see usable()")
    T, k = top_k_weights.shape
    N = y.shape[1]
    out = torch.empty((T, N), dtype=dtype, device=y.device)
    if T == 0:
        return out
    weights = top_k_weights.contiguous()
    block_n = 256
    _KERNELS.moe_combine_kernel[(T, -(-N // block_n))](y, pos, weights, out, N, k, y.stride(0), y.stride(1),
                                                       out.stride(0), out.stride(1), BLOCK_N=block_n)
    return out


def moe_gemm_or_none(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor | None:
    """:func:`moe_gemm`, or None (the caller's own path) when it cannot compile for this GPU (see :func:`or_none`)."""
    return or_none(moe_gemm, x, w, offs)


def or_none(fn: Callable[..., T], *args, **kwargs) -> T | None:
    """``fn(*args, **kwargs)``, or None when a kernel fails to compile for this GPU: the kernels are then turned off
    for the process, with a warning, instead of failing every step. A compilation happens at the first call of each
    shape, which the runtime makes eagerly before it captures a CUDA graph."""
    global _FAILED
    try:
        return fn(*args, **kwargs)
    except torch.OutOfMemoryError:  # the step's own trouble, not the kernels': keep them for the next one
        raise
    except Exception as exc:  # triton's CompilationError, an unsupported dtype on an older GPU, ...
        if _FAILED is None:
            _FAILED = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("dsft's Triton decode kernels are off (torch's ops instead): %s", _FAILED)
        return None
