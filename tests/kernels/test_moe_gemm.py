"""The decode-size grouped GEMM (a Triton kernel) against the plain per-expert loop, run in Triton's interpreter
on the CPU: empty experts, an expert with more rows than one block, a weight that is a strided view of a
``[W; A]`` buffer, rows that are a strided view, and no rows at all."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is part of the test extra (pip install -e '.[test]')")

CHECK = textwrap.dedent("""
    import torch
    from dsft.kernels.expert_lora import grouped_mm_reference
    from dsft.kernels.moe_gemm import moe_gemm

    g = torch.Generator().manual_seed(0)
    E, N = 6, 70
    cases = {"none": [0] * E, "one pair": [0, 0, 1, 0, 0, 0], "decode": [1, 0, 2, 1, 0, 2],
             "an expert over one block": [3, 0, 21, 0, 5, 1]}
    K = 200  # more than one K block of the experts' configuration
    for name, counts in cases.items():
        offs = torch.tensor(counts).cumsum(0).to(torch.int32)
        P = int(offs[-1])
        x = torch.randn(P, K + 3, generator=g)[:, :K]  # a strided view of wider rows
        buffer = torch.randn(E, N + 5, K, generator=g)  # each expert's W rows, then 5 A rows
        w = buffer[:, :N, :].transpose(1, 2)  # [E, K, N], as the runtime passes it
        for config in ({}, {"block_n": 32, "block_k": 16}):
            got = moe_gemm(x, w, offs, **config)
            want = grouped_mm_reference(x, w, offs)
            assert got.shape == (P, N), (name, got.shape)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)
    # A LoRA up-projection: K is a few ranks (its own tile configuration).
    offs = torch.tensor([2, 2, 5, 6, 6, 9]).to(torch.int32)
    for K in (8, 16, 48, 64):
        x, w = torch.randn(9, K, generator=g), torch.randn(E, N, K, generator=g).transpose(1, 2)
        torch.testing.assert_close(moe_gemm(x, w, offs), grouped_mm_reference(x, w, offs), rtol=1e-4, atol=1e-4)
    print("ok")
""")


def test_moe_gemm_equals_the_per_expert_loop_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_it_runs_only_where_it_was_measured_to_win(monkeypatch):
    import torch

    from dsft.kernels import moe_gemm

    x, w = torch.zeros(6, 8, dtype=torch.bfloat16), torch.zeros(2, 8, 4, dtype=torch.bfloat16)
    assert not moe_gemm.usable(x, w), "on the CPU, torch's path"
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert moe_gemm.usable(x, w) == moe_gemm.available()  # (not imported on a machine without CUDA)
    assert not moe_gemm.usable(torch.zeros(moe_gemm.MAX_PAIRS + 1, 8, dtype=torch.bfloat16), w)
    assert not moe_gemm.usable(x.float(), w.float()), "fp32 decodes through the reference loop"
    monkeypatch.setenv("DSFT_TRITON_MOE", "0")
    assert not moe_gemm.usable(x, w)


def test_a_kernel_that_cannot_compile_turns_itself_off_and_the_caller_falls_back(monkeypatch, caplog):
    import torch

    from dsft.kernels import moe_gemm

    def broken(*args, **kwargs):
        raise RuntimeError("CompilationError: bf16 dot needs sm80")
    monkeypatch.setattr(moe_gemm, "moe_gemm", broken)
    monkeypatch.setattr(moe_gemm, "_KERNEL", object())
    monkeypatch.setattr(moe_gemm, "_FAILED", None)
    x, w, offs = torch.zeros(6, 8), torch.zeros(2, 8, 4), torch.tensor([3, 6], dtype=torch.int32)
    with caplog.at_level("WARNING", logger="dsft.kernels"):
        assert moe_gemm.moe_gemm_or_none(x, w, offs) is None
    assert not moe_gemm.available() and "sm80" in caplog.text
    assert moe_gemm.moe_gemm_or_none(x, w, offs) is None and caplog.text.count("is off") == 1
