"""The Triton kernel of :mod:`dsft.kernels.rms_norm` (imported only where Triton can run).

``rms_norm_kernel``: program i normalises row i in fp32, rounds it to the output's dtype (transformers'
``.to(input_dtype)``), multiplies it by the weight in fp32 and rounds again (a bf16 product's rounding).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, out_ptr, H, sxm, som, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    live = cols < H
    x = tl.load(x_ptr + row * sxm + cols, mask=live, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    normed = (x * inv).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=live, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * som + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=live)
