"""The decode-size MoE kernels (Triton) against plain torch, run in Triton's interpreter on the CPU. The grouped
GEMM: empty experts, an expert with more rows than one block, a weight that is a strided view of a ``[W; A]``
buffer, rows that are a strided view, no rows at all, and its options (the tokens' rows in place, a rank mask, an
addend, SwiGLU, FP8 weights with row scales); the sort of the pairs by expert and the weighted sum back to tokens."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is part of the test extra (pip install -e '.[test]')")

CHECK = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from dsft.kernels import moe_gemm as kernels
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
    # route: the stable sort by expert, each expert's run end, each flat pair's place
    for T, k, E in [(1, 6, 64), (5, 2, 6), (40, 6, 64), (130, 6, 64), (3, 8, 256)]:
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        r = kernels.route(idx, E)
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)
        assert torch.equal(r.token, order // k), (T, k, E)
        assert torch.equal(r.expert, flat[order])
        counts = torch.bincount(flat, minlength=E)
        assert torch.equal(r.offs, counts.cumsum(0).to(torch.int32))
        assert torch.equal(order[r.pos.long()], torch.arange(len(order)))
    # combine: the weighted sum of each token's pairs
    T, k, N = 7, 3, 300
    idx = torch.stack([torch.randperm(5, generator=g)[:k] for _ in range(T)])
    r = kernels.route(idx, 5)
    y = torch.randn(T * k, N, generator=g)
    w = torch.rand(T, k, generator=g)
    want = torch.zeros(T, N).index_add_(0, r.token, y * w.reshape(-1)[torch.argsort(idx.reshape(-1), stable=True)][:, None])
    torch.testing.assert_close(kernels.combine(y, r.pos, w, torch.float32), want)
    # the options: the tokens' rows in place, a rank mask, an addend, SwiGLU
    E, H, I, R = 5, 48, 40, 12
    x = torch.randn(T, H, generator=g)
    wgu = torch.randn(E, 2 * I, H, generator=g)
    xs = x[r.token]
    base = grouped_mm_reference(xs, wgu.transpose(1, 2), r.offs)
    got = moe_gemm(x, wgu.transpose(1, 2), r.offs, tok=r.token, gather=True)
    torch.testing.assert_close(got, base, rtol=1e-4, atol=1e-4)
    gl = moe_gemm(x, wgu.transpose(1, 2), r.offs, tok=r.token, gather=True, glu=True)
    gg, uu = base.chunk(2, -1)
    torch.testing.assert_close(gl, F.silu(gg) * uu, rtol=1e-4, atol=1e-4)
    h = torch.randn(T * k, R, generator=g)
    B = torch.randn(E, 2 * I, R, generator=g)
    mask = (torch.rand(T, R, generator=g) > 0.5).float()
    want = base + grouped_mm_reference(h * mask[r.token], B.transpose(1, 2), r.offs)
    got = moe_gemm(h, B.transpose(1, 2), r.offs, tok=r.token, mask=mask, add=base)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    got = moe_gemm(h, B.transpose(1, 2), r.offs, tok=r.token, mask=mask, add=base, glu=True)
    gg, uu = want.chunk(2, -1)
    torch.testing.assert_close(got, F.silu(gg) * uu, rtol=1e-4, atol=1e-4)
    # FP8 weights with a scale per output row: the product of the weights they stand for, SwiGLU after the scales
    from dsft.kernels.fp8 import dequantize, quantize_rows
    q, scale = quantize_rows(wgu)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (E, 2 * I)
    base8 = grouped_mm_reference(xs, dequantize(q, scale, torch.float32).transpose(1, 2), r.offs)
    got = moe_gemm(x, q.transpose(1, 2), r.offs, tok=r.token, gather=True, scale=scale)
    torch.testing.assert_close(got, base8, rtol=1e-4, atol=1e-4)
    gl = moe_gemm(x, q.transpose(1, 2), r.offs, tok=r.token, gather=True, glu=True, scale=scale)
    gg, uu = base8.chunk(2, -1)
    torch.testing.assert_close(gl, F.silu(gg) * uu, rtol=1e-4, atol=1e-4)
    assert (base8 - base).abs().max() < 0.1 * base.abs().max()  # and they are the weights, to e4m3's rounding
    # A second weight in x's dtype beside FP8 weights, one launch (an FP8 expert's adapters' stacked A): its product
    # fills the columns after W's, in and out of decode sizes (columns over more than one block of each)
    A = torch.randn(E, 9, H, generator=g)  # [E, R, K]: R = 9 stacked ranks
    both = moe_gemm(x, q.transpose(1, 2), r.offs, tok=r.token, gather=True, scale=scale, second=A.transpose(1, 2))
    assert both.shape == (T * k, 2 * I + 9)
    torch.testing.assert_close(both[:, : 2 * I], base8, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(both[:, 2 * I :], grouped_mm_reference(xs, A.transpose(1, 2), r.offs), rtol=1e-4, atol=1e-4)
    narrow = moe_gemm(x, q.transpose(1, 2), r.offs, tok=r.token, gather=True, scale=scale, second=A.transpose(1, 2),
                      block_n=16)
    torch.testing.assert_close(narrow, both, rtol=1e-4, atol=1e-4)
    try:
        moe_gemm(x, wgu.transpose(1, 2), r.offs, tok=r.token, gather=True, second=A.transpose(1, 2))
        raise AssertionError("a second weight ran beside bf16 weights")
    except ValueError as e:
        assert "second weight" in str(e)
    # Prefill sizes (FP8 weights read in place): row blocks grow with the pairs; an expert over several blocks
    wide = torch.randn(E, 40, 96, generator=g)  # [E, N, K]
    q64, s64 = quantize_rows(wide)
    offs = torch.tensor([70, 70, 75, 205, 230]).to(torch.int32)  # E = 5 here
    xp = torch.randn(230, 96, generator=g)
    M = kernels.MAX_PAIRS
    assert [kernels.config(96, fp8=True, pairs=p)["block_m"] for p in (M, M + 1, 2 * M + 1, 4097)] == [16, 32, 64, 128]
    want = grouped_mm_reference(xp, dequantize(q64, s64, torch.float32).transpose(1, 2), offs)
    for bm in (32, 64, 128):
        torch.testing.assert_close(moe_gemm(xp, wide.transpose(1, 2), offs, block_m=bm),
                                   grouped_mm_reference(xp, wide.transpose(1, 2), offs), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(moe_gemm(xp, q64.transpose(1, 2), offs, scale=s64, block_m=bm), want, rtol=1e-4,
                                   atol=1e-4)
    # DSFT_FP8_DOT=f16: the tiles widen to fp16, x rounded to fp16 for the product (fp16's rounding, not fp32's)
    import os
    plain = moe_gemm(x, q.transpose(1, 2), r.offs, tok=r.token, gather=True, scale=scale)
    os.environ["DSFT_FP8_DOT"] = "f16"
    got = moe_gemm(x, q.transpose(1, 2), r.offs, tok=r.token, gather=True, scale=scale)
    scale_of = base8.abs().max().item()  # fp16 rounds x to 2^-11 relative: errors of that order of the outputs' size
    torch.testing.assert_close(got, base8, rtol=0, atol=2e-3 * scale_of)
    assert (got - plain).abs().max() > 1e-5 * scale_of  # x went through fp16 (the default path here: fp32 throughout)
    gl = moe_gemm(x, q.transpose(1, 2), r.offs, tok=r.token, gather=True, glu=True, scale=scale)
    torch.testing.assert_close(gl, F.silu(gg) * uu, rtol=0, atol=2e-3 * (F.silu(gg) * uu).abs().max().item())
    big = moe_gemm(x * 1e6, q.transpose(1, 2), r.offs, tok=r.token, gather=True, scale=scale)
    assert torch.isfinite(big).all()  # rows past fp16's range saturate instead of turning infinite
    # DSFT_FP8_DOT=fp8: each row of x quantised to e4m3 with its own scale, the products on FP8 tensor cores. The
    # interpreter's e4m3 arithmetic is coarser than a GPU's (its conversion does not round to nearest), so the check
    # is the size of e4m3's own error: a mis-indexed row or scale would be off by the outputs' whole size.
    os.environ["DSFT_FP8_DOT"] = "fp8"
    got = moe_gemm(x, q.transpose(1, 2), r.offs, tok=r.token, gather=True, scale=scale)
    assert ((got - base8).abs().max() / scale_of) < 0.15, (got - base8).abs().max() / scale_of
    big = moe_gemm(x * 1e6, q.transpose(1, 2), r.offs, tok=r.token, gather=True, scale=scale)
    torch.testing.assert_close(big / 1e6, got, rtol=1e-4, atol=1e-4 * scale_of)  # the row scale follows the rows
    gl = moe_gemm(x, q.transpose(1, 2), r.offs, tok=r.token, gather=True, glu=True, scale=scale)
    assert ((gl - F.silu(gg) * uu).abs().max() / (F.silu(gg) * uu).abs().max()) < 0.15
    del os.environ["DSFT_FP8_DOT"]
    try:
        moe_gemm(x, q.transpose(1, 2), r.offs, tok=r.token, gather=True)
        raise AssertionError("FP8 weights without their scale ran")
    except ValueError as e:
        assert "need their scale" in str(e)
    print("ok")
""")


def test_the_kernels_equal_plain_torch_in_the_interpreter():
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
    # FP8 weights take prefill sizes too (read in place), up to FP8_INPLACE_PAIRS; bf16 weights never
    many, w8 = torch.zeros(4096, 8, dtype=torch.bfloat16), w.to(torch.float8_e4m3fn)
    monkeypatch.delenv("DSFT_FP8_INPLACE_PAIRS", raising=False)
    assert moe_gemm.max_pairs(w8) == moe_gemm.FP8_INPLACE_PAIRS and moe_gemm.usable(many, w8) == moe_gemm.available()
    assert not moe_gemm.usable(torch.zeros(moe_gemm.FP8_INPLACE_PAIRS + 1, 8, dtype=torch.bfloat16), w8)
    assert moe_gemm.max_pairs(w) == moe_gemm.MAX_PAIRS and not moe_gemm.usable(many, w)
    monkeypatch.setenv("DSFT_FP8_INPLACE_PAIRS", "0")  # prefills widen the experts, as before
    assert moe_gemm.max_pairs(w8) == moe_gemm.MAX_PAIRS and not moe_gemm.usable(many, w8)
    monkeypatch.setenv("DSFT_FP8_INPLACE_PAIRS", "lots")
    assert moe_gemm.max_pairs(w8) == moe_gemm.FP8_INPLACE_PAIRS  # not a number: as if unset
    assert not moe_gemm.usable(x.float(), w.float()), "fp32 decodes through the reference loop"
    monkeypatch.setenv("DSFT_TRITON_MOE", "0")
    assert not moe_gemm.usable(x, w)


def test_a_kernel_that_cannot_compile_turns_itself_off_and_the_caller_falls_back(monkeypatch, caplog):
    import torch

    from dsft.kernels import moe_gemm

    def broken(*args, **kwargs):
        raise RuntimeError("CompilationError: bf16 dot needs sm80")
    monkeypatch.setattr(moe_gemm, "moe_gemm", broken)
    monkeypatch.setattr(moe_gemm, "_KERNELS", object())
    monkeypatch.setattr(moe_gemm, "_FAILED", None)
    x, w, offs = torch.zeros(6, 8), torch.zeros(2, 8, 4), torch.tensor([3, 6], dtype=torch.int32)
    with caplog.at_level("WARNING", logger="dsft.kernels"):
        assert moe_gemm.moe_gemm_or_none(x, w, offs) is None
    assert not moe_gemm.available() and "sm80" in caplog.text
    assert moe_gemm.moe_gemm_or_none(x, w, offs) is None and caplog.text.count("are off") == 1
