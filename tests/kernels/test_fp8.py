"""FP8 expert weights widened back (what a prefill does with each layer's FP8 experts): the one-pass Triton kernel
against the torch ops, in Triton's interpreter on the CPU; rows and widths that are not whole blocks."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from dsft.kernels import fp8

pytest.importorskip("triton", reason="Triton is part of the test extra (pip install -e '.[test]')")

CHECK = textwrap.dedent("""
    import torch
    from dsft.kernels import fp8

    g = torch.Generator().manual_seed(0)
    for shape in [(3, 70, 300), (2, 5, 17), (1, 1, 256)]:
        q = fp8.quantize_rows(torch.randn(*shape, generator=g))
        calls, real = [], fp8._dequantize_kernel
        fp8._dequantize_kernel = lambda *args: calls.append(1) or real(*args)
        for dtype in (torch.float32, torch.bfloat16):
            got, want = fp8.dequantize(q.q, q.scale, dtype), fp8.dequantize_reference(q.q, q.scale, dtype)
            assert got.dtype == dtype and got.shape == shape
            if dtype == torch.float32:  # the same fp32 product
                assert torch.equal(got, want), shape
            else:  # the interpreter truncates to bf16 where a GPU rounds to nearest even: one bf16 step at most
                torch.testing.assert_close(got, want, rtol=2 ** -7, atol=0)
        fp8._dequantize_kernel = real
        assert calls == [1, 1], "through the kernel"
    print("ok")
""")


def test_dequantize_kernel_equals_the_torch_ops():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_rows_round_trip_within_e4m3s_step():
    """Off a GPU the torch ops widen; each weight comes back within e4m3's relative step (2^-4) of its row's largest."""
    w = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(1))
    q = fp8.quantize_rows(w)
    back = fp8.dequantize(q.q, q.scale, torch.float32)
    assert q.q.dtype == fp8.FP8 and q.scale.shape == (4, 6)
    assert ((back - w).abs() <= w.abs().amax(-1, keepdim=True) * 2 ** -4).all()
