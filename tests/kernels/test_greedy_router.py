"""DeepSeek-V2's greedy router in two kernels (Triton; on unless DSFT_TRITON_ROUTER=0) against transformers'
router, in Triton's interpreter on the CPU: tokens over one block, a hidden size over several spans and not a whole
one, 64 experts and a count that is not a power of two, strided tokens; the runtime's patched router against
transformers' forward, and no patch with the switch off."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is part of the test extra (pip install -e '.[test]')")

CHECK = textwrap.dedent("""
    import torch
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from dsft.kernels import router
    from dsft.runtime.fused_router import patch_routers, restore_routers

    g = torch.Generator().manual_seed(0)
    for T, H, E, k in [(1, 96, 64, 6), (21, 600, 10, 3), (70, 64, 64, 6)]:
        x = torch.randn(T, H + 4, generator=g)[:, :H]
        w = torch.randn(E, H, generator=g) * 0.1
        got, want = router.greedy_route(x, w, k, 16.0), router.greedy_route_reference(x, w, k, 16.0)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    config = DeepseekV2Config(hidden_size=64, n_routed_experts=8, num_experts_per_tok=2, routed_scaling_factor=2.5,
                              topk_method="greedy")
    gate = DeepseekV2TopkRouter(config)
    torch.nn.init.normal_(gate.weight, std=0.2, generator=g)
    h = torch.randn(3, 5, 64, generator=g)
    want_logits, want_w, want_i = gate(h)
    import os
    os.environ["DSFT_TRITON_ROUTER"] = "0"  # switched off: not patched at all
    assert patch_routers(torch.nn.Sequential(gate)) == [] and "forward" not in gate.__dict__
    del os.environ["DSFT_TRITON_ROUTER"]  # the default: patched
    assert patch_routers(torch.nn.Sequential(gate)) == [gate]
    calls, real = [], router.greedy_route
    router.greedy_route = lambda *args: calls.append(1) or real(*args)
    logits, weights, index = gate(h)
    assert calls == [1], "the patched router ran the kernels"
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    order = torch.argsort(want_i, dim=-1)  # transformers' topk(sorted=False): the same experts, in its own order
    torch.testing.assert_close(index.sort(dim=-1).values, want_i.gather(-1, order))
    torch.testing.assert_close(weights.gather(-1, torch.argsort(index, dim=-1)), want_w.gather(-1, order))
    restore_routers([gate])
    assert "forward" not in gate.__dict__
    print("ok")
""")


def test_router_kernels_equal_transformers_router():
    env = {k: v for k, v in os.environ.items() if k != "DSFT_TRITON_ROUTER"} | {"TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]

