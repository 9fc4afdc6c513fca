"""dsft::linear_part, a dense linear whose weight's last r rows are a trained part, against plain autograd."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dsft.kernels.linear_part import linear_part


def _run(fn, x, frozen, part):
    x, part = x.clone().requires_grad_(), part.clone().requires_grad_()
    y = fn(x, frozen, part)
    (y.square() * torch.arange(y.shape[-1])).sum().backward()
    return y, x.grad, part.grad


def test_linear_part_gives_x_and_the_part_their_gradients_and_the_frozen_rows_none():
    torch.manual_seed(0)
    x, frozen, part = torch.randn(2, 5, 8), torch.randn(6, 8), torch.randn(3, 8)
    got = _run(lambda x, w, p: linear_part(x, torch.cat([w, p.detach()]), p), x, frozen, part)
    want = _run(lambda x, w, p: F.linear(x, torch.cat([w, p])), x, frozen, part)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_linear_part_compiles_without_graph_breaks():
    torch.manual_seed(1)
    x, frozen, part = torch.randn(4, 8), torch.randn(6, 8), torch.randn(3, 8)
    fn = torch.compile(lambda x, w, p: linear_part(x, torch.cat([w, p.detach()]), p), fullgraph=True)
    got = _run(fn, x, frozen, part)
    want = _run(lambda x, w, p: F.linear(x, torch.cat([w, p])), x, frozen, part)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_an_fp32_part_of_a_bf16_weight_gets_an_fp32_gradient():
    """The trained part may be the fp32 master of the bf16 rows in w (its values are not read)."""
    torch.manual_seed(2)
    x, frozen, part = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(6, 8, dtype=torch.bfloat16), torch.randn(3, 8)
    part = part.requires_grad_()
    linear_part(x, torch.cat([frozen, part.detach().bfloat16()]), part).sum().backward()
    assert part.grad.dtype == torch.float32
    torch.testing.assert_close(part.grad, x.float().sum(0).expand(3, 8), rtol=1e-2, atol=1e-2)
