"""kv_b_proj folded into DeepSeek-V2's decode query and output with its per-row LoRA, one Triton kernel each,
against the torch ops in Triton's interpreter on the CPU: strided views as the absorbed decode has them (the query's
nope columns of the q projection, W_UK / W_UV and B_UK / B_UV as halves of kv_b_proj's weight and LoRA B, the
attended latents transposed), sizes over and under a block, ranks over several blocks, no mask, no LoRA, no rows."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is part of the test extra (pip install -e '.[test]')")

CHECK = textwrap.dedent("""
    import torch
    from dsft.kernels import mla_absorb

    g = torch.Generator().manual_seed(0)
    for b, nh, dn, dr, dv, C, R, masked in [(1, 3, 24, 8, 20, 40, 16, True), (5, 2, 80, 8, 72, 200, 80, True),
                                             (40, 3, 16, 8, 16, 130, 16, False), (2, 2, 32, 8, 32, 64, 0, False),
                                             (0, 2, 16, 8, 16, 32, 16, True)]:
        q = torch.randn(b, nh, dn + dr, generator=g)
        w = torch.randn(nh, dn + dv, C, generator=g) / C ** 0.5
        B = torch.randn(nh * (dn + dv), max(R, 1), generator=g)[:, :R] / dn ** 0.5  # outputs ~1: a tolerance that means something
        A = torch.randn(R, C + 3, generator=g)[:, :C] / max(R, 1) ** 0.5
        mask = (torch.rand(b, R, generator=g) > 0.5).float() if masked else None
        Bh = B.view(nh, dn + dv, R)
        q_nope = q[..., :dn]
        lora_q = (A, Bh[:, :dn], mask) if R else None
        want = mla_absorb.absorb_query_reference(q_nope, w[:, :dn], lora_q)
        got = mla_absorb.absorb_query(q_nope, w[:, :dn], lora_q)
        assert got.shape == (nh, b, C) and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str((b, nh, C, R, masked)))

        o_lat = torch.randn(b, nh, C, generator=g).transpose(0, 1)  # [nh, b, C], strided
        lora_o = (A, Bh[:, dn:], mask) if R else None
        want = mla_absorb.absorb_output_reference(o_lat, w[:, dn:], lora_o)
        got = mla_absorb.absorb_output(o_lat, w[:, dn:], lora_o)
        assert got.shape == (b, nh * dv)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=str((b, nh, dv, R, masked)))
    print("ok")
""")


def test_absorb_kernels_equal_the_torch_ops():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
