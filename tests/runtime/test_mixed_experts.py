"""The mixed-adapter routed-experts forward against the plain reference, token by token."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from dsft.kernels.expert_lora import LowRank, experts_forward_reference
from dsft.kernels.fp8 import dequantize, quantize_rows
from dsft.runtime import mixed_experts
from dsft.runtime.fused_linear import FusedWeights
from dsft.runtime.mixed_experts import experts_forward_mixed
from dsft.runtime.row_groups import RowGroups, stack_experts


def _lowrank(g, E, out, inp, r):
    return LowRank(torch.randn(E, r, inp, generator=g) * 0.3, torch.randn(E, out, r, generator=g) * 0.3, 1.5)


def _step(g, T, H, I, E, k):
    """A step's tokens [T, H], each one's top-k experts and routing weights, and E experts' gate_up and down."""
    x = torch.randn(T, H, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    return x, index, weights, torch.randn(E, 2 * I, H, generator=g) * 0.2, torch.randn(E, H, I, generator=g) * 0.2


@pytest.mark.parametrize("fused", [False, True], ids=["A-apart", "A-under-W"])
@pytest.mark.parametrize("few_pairs", [0, 64], ids=["grouped", "gathered"])
def test_each_token_gets_its_own_adapters_experts(monkeypatch, few_pairs, fused):
    monkeypatch.setattr(mixed_experts, "FEW_PAIRS", few_pairs)  # 48 pairs: grouped GEMMs, or gathered factors
    g = torch.Generator().manual_seed(0)
    T, H, I, E, k = 24, 16, 8, 6, 2
    x, index, weights, gate_up, down = _step(g, T, H, I, E, k)
    a = (_lowrank(g, E, 2 * I, H, 4), _lowrank(g, E, H, I, 4))
    b = (_lowrank(g, E, 2 * I, H, 2), None)  # another rank, and LoRA on gate_up only
    owners = ["a", "b", None] * (T // 3)  # one token per row here
    rows = RowGroups.of(owners, "cpu")
    gu = (stack_experts([a[0], b[0]]), rows.column_mask((0, 1), (4, 2), T, x.dtype))
    dn = (stack_experts([a[1]]), rows.column_mask((0,), (4,), T, x.dtype))
    weights_of = (None, None)
    if fused:  # each expert's stacked A rows under its W rows: x A_e^T comes out of the base experts' GEMM
        module = torch.nn.Module()
        module.gate_up_proj, module.down_proj = torch.nn.Parameter(gate_up.clone()), torch.nn.Parameter(down.clone())
        buffers = FusedWeights()
        weights_of = (buffers.get("e", module, gu[0].A, 1, "gate_up_proj"), buffers.get("e", module, dn[0].A, 1, "down_proj"))
        assert weights_of[0].stacked.shape == (E, 2 * I + 6, H) and module.gate_up_proj.data_ptr() == weights_of[0].stacked.data_ptr()
        gate_up, down = module.gate_up_proj.detach(), module.down_proj.detach()
    got = experts_forward_mixed(x, index, weights, gate_up, down, F.silu, gu, dn, fused=weights_of)
    if fused:
        buffers.release("e", module, "gate_up_proj")
        assert module.gate_up_proj.is_contiguous() and module.gate_up_proj.untyped_storage().nbytes() == gate_up.numel() * 4
        torch.testing.assert_close(module.gate_up_proj, gate_up)
    for who, lora in (("a", a), ("b", b), (None, (None, None))):
        sel = torch.tensor([o == who for o in owners])
        want = experts_forward_reference(x[sel], index[sel], weights[sel], gate_up, down, F.silu, *lora)
        torch.testing.assert_close(got[sel], want, rtol=1e-5, atol=1e-5)


IN_KERNELS = textwrap.dedent("""
    import torch
    import torch.nn.functional as F
    from transformers.activations import ACT2FN

    from dsft.kernels import moe_gemm
    from dsft.kernels.expert_lora import LowRank, experts_forward_reference
    from dsft.kernels.fp8 import dequantize, quantize_rows
    from dsft.runtime import mixed_experts
    from dsft.runtime.fused_linear import FusedWeights
    from dsft.runtime.row_groups import RowGroups, stack_experts

    moe_gemm.usable = lambda x, w: True  # as on a GPU in half precision
    def no_torch_route(*args):
        raise AssertionError("the kernels' path was not taken")
    mixed_experts._route = no_torch_route

    def lowrank(g, E, out, inp, r):
        return LowRank(torch.randn(E, r, inp, generator=g) * 0.3, torch.randn(E, out, r, generator=g) * 0.3, 1.5)

    g = torch.Generator().manual_seed(0)
    T, H, I, E, k = 12, 16, 8, 6, 2
    x = torch.randn(T, H, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    weights[0, 1] = 0.0  # an ESFT adapter's pair is dropped so
    gate_up, down = torch.randn(E, 2 * I, H, generator=g) * 0.2, torch.randn(E, H, I, generator=g) * 0.2
    a = (lowrank(g, E, 2 * I, H, 4), lowrank(g, E, H, I, 4))
    b = (lowrank(g, E, 2 * I, H, 2), None)
    owners = ["a", "b", None] * (T // 3)
    rows = RowGroups.of(owners, "cpu")
    gu = (stack_experts([a[0], b[0]]), rows.column_mask((0, 1), (4, 2), T, x.dtype))
    dn = (stack_experts([a[1]]), rows.column_mask((0,), (4,), T, x.dtype))
    q = (quantize_rows(gate_up), quantize_rows(down))
    for case in ("A under W", "A apart", "no LoRA", "FP8 experts", "FP8 experts, no LoRA"):
        fp8 = case.startswith("FP8")
        module = torch.nn.Module()
        module.gate_up_proj, module.down_proj = (torch.nn.Parameter(q[0].q, requires_grad=False), torch.nn.Parameter(
            q[1].q, requires_grad=False)) if fp8 else (torch.nn.Parameter(gate_up.clone()), torch.nn.Parameter(down.clone()))
        fused = (None, None)
        if case in ("A under W", "FP8 experts"):  # FP8 weights and the adapters' A never share a buffer
            buffers = FusedWeights()
            fused = (buffers.get("e", module, gu[0].A, 1, "gate_up_proj"), buffers.get("e", module, dn[0].A, 1, "down_proj"))
            assert (fused == (None, None)) == fp8
        loras = (None, None) if case.endswith("no LoRA") else (gu, dn)
        scales = (q[0].scale, q[1].scale) if fp8 else (None, None)
        got = mixed_experts.experts_forward_mixed(x, index, weights, module.gate_up_proj.detach(), module.down_proj.detach(),
                                                  ACT2FN["silu"], *loras, fused=fused, scales=scales)
        w_gu, w_dn = (dequantize(q[0].q, q[0].scale, x.dtype), dequantize(q[1].q, q[1].scale, x.dtype)) if fp8 else (gate_up, down)
        for who, lora in (("a", a), ("b", b), (None, (None, None))):
            sel = torch.tensor([o == who for o in owners])
            want = experts_forward_reference(x[sel], index[sel], weights[sel], w_gu, w_dn, F.silu,
                                             *((None, None) if case.endswith("no LoRA") else lora))
            torch.testing.assert_close(got[sel], want, rtol=1e-5, atol=1e-5, msg=f"{case}, adapter {who}")
    # FP8 experts with the adapters' A in the base product's launch (the default; DSFT_FP8_FUSED_A=0 two launches):
    # the same outputs, one call fewer
    import os
    calls: list[bool] = []
    plain_gemm = moe_gemm.moe_gemm
    def counted(*args, **kwargs):
        calls.append(kwargs.get("second") is not None)
        return plain_gemm(*args, **kwargs)
    moe_gemm.moe_gemm = counted
    w_gu, w_dn = dequantize(q[0].q, q[0].scale, x.dtype), dequantize(q[1].q, q[1].scale, x.dtype)
    # per projection: W and A together, then the up-projection; switched off, W, A, up-projection apart
    for env, want_calls in (("1", [True, False, True, False]), ("0", [False] * 6)):
        calls.clear()
        os.environ["DSFT_FP8_FUSED_A"] = env
        got = mixed_experts.experts_forward_mixed(x, index, weights, q[0].q, q[1].q, ACT2FN["silu"], gu, dn,
                                                  scales=(q[0].scale, q[1].scale))
        assert calls == want_calls, (env, calls)
        for who, lora in (("a", a), ("b", b), (None, (None, None))):
            sel = torch.tensor([o == who for o in owners])
            want = experts_forward_reference(x[sel], index[sel], weights[sel], w_gu, w_dn, F.silu, *lora)
            torch.testing.assert_close(got[sel], want, rtol=1e-5, atol=1e-5, msg=f"A beside FP8 W={env}, adapter {who}")
    del os.environ["DSFT_FP8_FUSED_A"]
    moe_gemm.moe_gemm = plain_gemm
    # A prefill's FP8 experts read in place (up to DSFT_FP8_INPLACE_PAIRS): past MAX_PAIRS, rows in larger blocks
    os.environ["DSFT_FP8_INPLACE_PAIRS"] = "1024"
    T = 402
    x = torch.randn(T, H, generator=g)
    index = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    weights = torch.rand(T, k, generator=g)
    owners = ["a", "b", None] * (T // 3)
    rows = RowGroups.of(owners, "cpu")
    gu = (stack_experts([a[0], b[0]]), rows.column_mask((0, 1), (4, 2), T, x.dtype))
    dn = (stack_experts([a[1]]), rows.column_mask((0,), (4,), T, x.dtype))
    assert index.numel() > moe_gemm.MAX_PAIRS
    got = mixed_experts.experts_forward_mixed(x, index, weights, q[0].q, q[1].q, ACT2FN["silu"], gu, dn,
                                              scales=(q[0].scale, q[1].scale))
    w_gu, w_dn = dequantize(q[0].q, q[0].scale, x.dtype), dequantize(q[1].q, q[1].scale, x.dtype)
    for who, lora in (("a", a), ("b", b), (None, (None, None))):
        sel = torch.tensor([o == who for o in owners])
        want = experts_forward_reference(x[sel], index[sel], weights[sel], w_gu, w_dn, F.silu, *lora)
        torch.testing.assert_close(got[sel], want, rtol=1e-5, atol=1e-5, msg=f"prefill in place, adapter {who}")
    print("ok")
""")


def test_a_decode_steps_experts_in_the_triton_kernels_equal_the_reference():
    """The six-kernel path a GPU takes (sort, gate_up on the tokens in place, LoRA + SwiGLU, down, LoRA, weighted sum),
    run in Triton's interpreter against the reference, token by token, each with its own adapter; with FP8 experts,
    against the reference on the weights they stand for."""
    pytest.importorskip("triton", reason="Triton is part of the test extra (pip install -e '.[test]')")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", IN_KERNELS], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_fp8_experts_in_a_larger_step_are_widened_and_give_the_reference_on_their_weights():
    """Past the decode kernels (a prefill, or the CPU) FP8 experts are widened to the activations' dtype first."""
    g = torch.Generator().manual_seed(2)
    T, H, I, E, k = 20, 16, 8, 6, 2
    x, index, weights, gate_up, down = _step(g, T, H, I, E, k)
    a = (_lowrank(g, E, 2 * I, H, 4), _lowrank(g, E, H, I, 4))
    gu, dn = quantize_rows(gate_up), quantize_rows(down)
    got = experts_forward_mixed(x, index, weights, gu.q, dn.q, F.silu, (a[0], None), (a[1], None), scales=(gu.scale, dn.scale))
    want = experts_forward_reference(x, index, weights, dequantize(gu.q, gu.scale, x.dtype),
                                     dequantize(dn.q, dn.scale, x.dtype), F.silu, *a)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    exact = experts_forward_reference(x, index, weights, gate_up, down, F.silu, *a)
    assert 0 < (got - exact).abs().max() < 0.05 * exact.abs().max()  # FP8's rounding, no more


def test_fp8_rows_round_within_e4m3s_step():
    w = torch.randn(3, 40, 64) * torch.logspace(-3, 1, 40)[None, :, None]  # rows of very different magnitudes
    w[1, 5] = 0.0  # a row of zeros keeps scale 1
    q = quantize_rows(w)
    assert q.q.dtype == torch.float8_e4m3fn and q.scale.shape == (3, 40) and q.scale[1, 5] == 1
    back = dequantize(q.q, q.scale, torch.float32)
    # 3 mantissa bits: half a step is 2^-4 of the value; below e4m3's normal range the step is the row scale's 2^-9
    bound = torch.maximum(w.abs() * 2**-4, q.scale[..., None] * 2**-10) * 1.001
    assert ((back - w).abs() <= bound).all()
    assert (q.q.float().abs().amax(-1)[q.scale != 1] == 448).all()  # each row's largest weight uses the full range
