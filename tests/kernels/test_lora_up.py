"""The in-place LoRA up-projection with each row's rank mask (Triton) against the torch ops, in Triton's
interpreter on the CPU: h and y as strided slices of one ``[y | h]`` GEMM output (how the runtime's fused LoRA
linears leave them), ranks over one block, no mask, no rows; the runtime's fused linear through it; and a SwiGLU
MLP's gate and up up-projections with the activation in one kernel."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is part of the test extra (pip install -e '.[test]')")

CHECK = textwrap.dedent("""
    import torch
    from dsft.kernels import lora_up
    from dsft.runtime.fused_linear import Fused, fused_lora_linear

    g = torch.Generator().manual_seed(0)
    for M, N, R, masked in [(1, 70, 16, True), (5, 33, 64, True), (40, 100, 80, True), (3, 64, 16, False), (0, 8, 16, True)]:
        full = torch.randn(M, N + R, generator=g)
        y, h = full[:, :N], full[:, N:]
        B = torch.randn(N + 2, R, generator=g)[:N]
        mask = (torch.rand(M, R, generator=g) > 0.5).float() if masked else None
        want = lora_up.lora_up_reference(y.clone(), h, B, mask)
        got = lora_up.lora_up_(y, h, B, mask)
        assert got.data_ptr() == full.data_ptr()  # in place, in the GEMM output
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str((M, N, R, masked)))
        torch.testing.assert_close(full[:, N:], h)  # h untouched
    # the runtime's fused LoRA linear: [W; A] in one GEMM, the masked up-projection in the kernel
    x = torch.randn(2, 3, 24, generator=g)
    W, A, B, bias = torch.randn(40, 24, generator=g), torch.randn(32, 24, generator=g), torch.randn(40, 32, generator=g), torch.randn(40, generator=g)
    mask = (torch.rand(6, 32, generator=g) > 0.5).float()
    fused = Fused(torch.cat([W, A]), torch.cat([bias, torch.zeros(32)]), 40, 1)
    want = torch.nn.functional.linear(x, W, bias) + ((x @ A.t()) * mask.view(2, 3, 32)) @ B.t()
    calls, real = [], lora_up.lora_up_
    lora_up.lora_up_ = lambda *args: calls.append(1) or real(*args)
    torch.testing.assert_close(fused_lora_linear(x, fused, B, mask), want, rtol=1e-5, atol=1e-5)
    assert calls == [1], "the fused linear went through the kernel"
    # a SwiGLU MLP's gate and up projections at once: both masked up-projections and silu(gate) * up in one kernel,
    # g / hg and u / hu as slices of their [y | h] GEMM outputs
    for M, N, R, masked in [(1, 70, 16, True), (5, 33, 80, True), (40, 100, 16, False), (0, 8, 16, True)]:
        full_g, full_u = torch.randn(M, N + R, generator=g), torch.randn(M, N + R, generator=g)
        Bg, Bu = torch.randn(N, R, generator=g) / R ** 0.5, torch.randn(N, R, generator=g) / R ** 0.5
        mask = (torch.rand(M, R, generator=g) > 0.5).float() if masked else None
        args = (full_g[:, :N], full_g[:, N:], Bg, full_u[:, :N], full_u[:, N:], Bu, mask)
        before = (full_g.clone(), full_u.clone())
        got, want = lora_up.swiglu_up(*args), lora_up.swiglu_up_reference(*args)
        assert got.shape == (M, N)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str((M, N, R, masked)))
        assert torch.equal(full_g, before[0]) and torch.equal(full_u, before[1])  # the GEMM outputs untouched
    print("ok")
""")


def test_lora_up_kernel_equals_the_torch_ops():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
