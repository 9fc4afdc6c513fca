"""Llama's RMSNorm in one Triton kernel against the torch ops (and transformers' own norm), in Triton's interpreter
on the CPU: widths over and under a power of two, strided rows, fp32 exactly and bf16 within one rounding step (the
interpreter truncates bf16 where a GPU rounds to nearest), no rows; and the runtime's patched norm through it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is part of the test extra (pip install -e '.[test]')")

CHECK = textwrap.dedent("""
    import torch
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm
    from dsft.kernels import rms_norm
    from dsft.runtime.fused_norms import fuse_rms_norms

    g = torch.Generator().manual_seed(0)
    for rows, H in [(1, 2048), (7, 600), (3, 16), (0, 64)]:
        x = (torch.randn(rows, H + 5, generator=g) * 3)[:, :H]  # rows of a wider buffer
        w = torch.randn(H, generator=g)
        got, want = rms_norm.rms_norm(x, w, 1e-6), rms_norm.rms_norm_reference(x, w, 1e-6)
        assert got.shape == x.shape and got.dtype == x.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        xb, wb = x.bfloat16(), w.bfloat16()
        got, want = rms_norm.rms_norm(xb, wb, 1e-6).float(), rms_norm.rms_norm_reference(xb, wb, 1e-6).float()
        torch.testing.assert_close(got, want, rtol=2 ** -6, atol=1e-6)  # one bf16 step of each rounding
    # the runtime's norm (transformers' DeepSeek-V2 class, patched) runs the kernel and equals the unpatched one
    norm = DeepseekV2RMSNorm(96, eps=1e-6)
    torch.nn.init.normal_(norm.weight, generator=g)
    x = torch.randn(2, 3, 96, generator=g)
    want = norm(x)
    calls, real = [], rms_norm.rms_norm
    rms_norm.rms_norm = lambda *a: calls.append(1) or real(*a)
    assert fuse_rms_norms(norm) == [norm]
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-5)
    assert calls == [1]
    print("ok")
""")


def test_rms_norm_kernel_equals_the_torch_ops():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
