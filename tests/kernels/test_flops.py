"""The compiler prices dsft's grouped GEMMs by their FLOPs (uncounted, an op costs it 1), so a memory budget
recomputes pointwise work before them. (On CPU, one compiled DeepSeek-V2-Lite-shape layer under a budget of 0.6
kept the routed gate/up output only with the formulas registered: ``.bench_tmp/saved_bytes.py``, 2026-12-02.)"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from dsft.kernels.flops import register_flop_formulas
from dsft.kernels.grouped_mm import gmm
from dsft.kernels.linear_part import linear_part

OFFS = torch.tensor([3, 3, 8], dtype=torch.int32)  # three groups, the middle one empty


def test_grouped_and_folded_gemms_count_their_flops():
    register_flop_formulas()
    register_flop_formulas()  # idempotent
    x, w = torch.randn(8, 16), torch.randn(3, 16, 24)
    with FlopCounterMode(display=False) as counted:
        gmm(x, w, OFFS)
        linear_part(torch.randn(2, 5, 16), torch.randn(24, 16), torch.randn(4, 16))
    assert counted.get_total_flops() == 2 * 8 * 16 * 24 + 2 * 10 * 16 * 24


def test_packed_attention_is_priced_as_causal_attention_over_its_longest_example():
    from dsft.kernels.flops import _varlen_attn

    # 8,192 packed tokens, 16 heads, q/k 192 and v 192 wide, examples up to 2,048 (cu_seqlens arrive as shapes)
    flops = _varlen_attn((8192, 16, 192), (8192, 16, 192), (8192, 16, 192), (5,), (5,), 2048, 2048)
    assert flops == 8192 * 2048 * 16 * (192 + 192)  # 2 x (q k^T + p v), half of each computed (causal)
