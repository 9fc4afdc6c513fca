"""NF4 storage of frozen weights: 4.5 bits a value, per-block absmax, dequantised where used."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsft.kernels.nf4 import Nf4Linear, Nf4Tensor, dequantize, quantize


def test_round_trip_error_is_bounded_by_each_blocks_absmax():
    w = torch.randn(4, 64, 32, generator=torch.Generator().manual_seed(0))
    packed, absmax = quantize(w)
    assert packed.numel() == w.numel() // 2 and absmax.numel() == w.numel() // 64
    back = dequantize(packed, absmax, w.shape, torch.float32)
    err = (back - w).abs().view(-1, 64).amax(1)
    # NF4's widest gap between neighbouring codes (-1 to -0.696) is 0.304 of the block's absmax: an error is at most half.
    assert torch.all(err <= 0.153 * w.abs().view(-1, 64).amax(1))
    assert torch.allclose(absmax, w.abs().view(-1, 64).amax(1))


def test_fused_experts_quantise_per_expert():
    """No 64-value block spans two experts: an expert's codes depend on that expert alone."""
    w = torch.randn(3, 8, 16)
    alone = dequantize(*quantize(w[1]), (8, 16), torch.float32)
    assert torch.equal(Nf4Tensor(w)()[1], alone)


def test_nf4_linear_is_the_linear_of_its_dequantised_weight():
    lin = torch.nn.Linear(128, 64, bias=True)
    q = Nf4Linear(lin)
    x = torch.randn(5, 128)
    torch.testing.assert_close(q(x), F.linear(x, q.nf4(), lin.bias), rtol=0, atol=0)
    assert (q(x) - lin(x)).norm() < 0.15 * lin(x).norm()  # close to the original, as 4 bits allow
    assert sum(b.numel() * b.element_size() for b in q.buffers()) < 0.15 * lin.weight.numel() * 4


def test_a_size_that_does_not_fill_blocks_is_refused():
    with pytest.raises(ValueError, match="multiple of 64"):
        quantize(torch.randn(10, 3))


def test_a_compiled_layer_traces_the_dequantisation_as_one_op_without_graph_breaks():
    """Inside a compiled decoder layer each NF4 weight is one op of the graph: an import check on the way broke the
    graph at every weight (41 breaks and 34 recompiles a training step on the H200, the step bound by the host)."""
    lin = Nf4Linear(torch.nn.Linear(128, 64))
    experts = Nf4Tensor(torch.randn(2, 64, 128))

    def layer(x):
        return lin(x) + (x @ experts()[1].t())
    explained = torch._dynamo.explain(layer)(torch.randn(3, 128))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
