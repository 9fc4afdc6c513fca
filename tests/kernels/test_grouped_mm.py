"""The grouped-GEMM custom ops (the CUDA path's building block) against the plain per-group loop.

torch._grouped_mm also runs on CPU in fp32 for 16-byte-aligned shapes, so the ops, their backward
and their behaviour under torch.compile are checked here without a GPU.
"""
from __future__ import annotations

import torch

from dsft.kernels.expert_lora import grouped_mm_reference
from dsft.kernels.grouped_mm import gmm

OFFS = torch.tensor([3, 3, 12, 16], dtype=torch.int32)  # one empty group


def _grads(fn, x, w):
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    y = fn(x, w, OFFS)
    y.square().sum().backward()
    return y, x.grad, w.grad


def test_gmm_and_its_gradients_equal_the_loop():
    torch.manual_seed(0)
    x, w = torch.randn(16, 8), torch.randn(4, 8, 16)
    for got, want in zip(_grads(gmm, x, w), _grads(grouped_mm_reference, x, w)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_frozen_weight_gets_no_gradient_and_costs_no_saved_input():
    x = torch.randn(16, 8, requires_grad=True)
    w = torch.randn(4, 8, 16)
    gmm(x, w, OFFS).sum().backward()
    assert x.grad is not None and w.grad is None


def test_compiled_with_a_transposed_weight():
    torch.manual_seed(1)
    x, w = torch.randn(16, 8), torch.randn(4, 16, 8)  # stored [G, out, in] like expert weights
    loss = torch.compile(lambda x, w: gmm(x, w.transpose(1, 2), OFFS).square().sum(), fullgraph=True)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss(xa, wa).backward()
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    grouped_mm_reference(xb, wb.transpose(1, 2), OFFS).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-4, atol=1e-4)


def test_folded_ops_give_the_trained_slice_its_gradient_and_the_rest_none():
    """gmm_part trains w's last r input rows ("rows": the values of ``tail``) or its last r output columns
    ("cols"): output and gradients equal the plain loop on the concatenated weight. Weights are transposed
    views of [G, out, in] buffers, as the folded expert weights are."""
    from dsft.kernels.grouped_mm import gmm_part

    torch.manual_seed(2)
    cases = (  # (where, x, frozen part, trained part, dim they are joined along)
        ("rows", torch.randn(16, 12), torch.randn(4, 16, 8).transpose(1, 2), torch.randn(4, 16, 4).transpose(1, 2), 1),
        ("cols", torch.randn(16, 8), torch.randn(4, 16, 8).transpose(1, 2), torch.randn(4, 4, 8).transpose(1, 2), 2),
    )
    for where, x, frozen, tail, dim in cases:
        w = torch.cat([frozen, tail], dim=dim)
        xa, ta = x.clone().requires_grad_(), tail.clone().requires_grad_()
        ya = gmm_part(xa, w, ta, OFFS, where)
        ya.square().sum().backward()
        xb, tb = x.clone().requires_grad_(), tail.clone().requires_grad_()
        yb = grouped_mm_reference(xb, torch.cat([frozen, tb], dim=dim), OFFS)
        yb.square().sum().backward()
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ta.grad, tb.grad, rtol=1e-5, atol=1e-5)


def test_an_expert_no_token_chose_gets_a_zero_gradient_whatever_the_kernel_left_there(monkeypatch):
    """On CUDA torch._grouped_mm leaves an empty group's weight-gradient slice unwritten (recycled memory: NaN
    at times, which then poisons the whole adapter at the next optimizer step). Simulated here by a kernel that
    fills empty groups with NaN: the op still returns zeros there and the true gradient elsewhere."""
    from dsft.kernels.grouped_mm import gmm_wgrad

    real = torch._grouped_mm

    def leaves_garbage(a, b, offs=None, **kw):
        out = real(a, b, offs=offs, **kw)
        if out.dim() == 3:
            empty = torch.diff(offs, prepend=offs.new_zeros(1)) == 0
            out[empty] = float("nan")
        return out

    monkeypatch.setattr(torch, "_grouped_mm", leaves_garbage)
    torch.manual_seed(3)
    x, dy = torch.randn(16, 8), torch.randn(16, 4)
    dw = gmm_wgrad(x, dy, OFFS)
    assert torch.isfinite(dw).all() and not dw[1].any()
    want = [x[a:b].t() @ dy[a:b] for a, b in ((0, 3), (3, 12), (12, 16))]
    torch.testing.assert_close(dw[[0, 2, 3]], torch.stack(want), rtol=1e-5, atol=1e-5)


def test_the_public_grouped_mm_where_torch_has_it_else_the_private_op(monkeypatch):
    from dsft.kernels import grouped_mm as ops

    torch.manual_seed(0)
    x, w = torch.randn(16, 8), torch.randn(4, 8, 16)
    want = grouped_mm_reference(x, w, OFFS)
    calls = []
    public = getattr(torch.nn.functional, "grouped_mm", None)
    if public is not None:
        monkeypatch.setattr(torch.nn.functional, "grouped_mm", lambda *a, **k: calls.append("public") or public(*a, **k))
        torch.testing.assert_close(ops.grouped_mm_kernel(x, w, OFFS), want, rtol=1e-5, atol=1e-5)
        assert calls == ["public"]
        monkeypatch.delattr(torch.nn.functional, "grouped_mm")  # an older torch: the private op alone
    assert ops.has_grouped_mm()
    torch.testing.assert_close(ops.grouped_mm_kernel(x, w, OFFS), want, rtol=1e-5, atol=1e-5)
    assert calls == (["public"] if public is not None else [])  # the private op alone, without the public one
