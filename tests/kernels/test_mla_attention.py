"""The absorbed MLA decode kernels (Triton) against the torch ops they replace, in Triton's interpreter on the CPU:
strided queries and latent projections (views of wider buffers, as fused LoRA GEMMs leave them), more heads than
one program holds, rows writing at different columns, masks with holes, each row's columns in one span or in
several added up."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="Triton is part of the test extra (pip install -e '.[test]')")

CHECK = textwrap.dedent("""
    import torch
    from dsft.kernels import mla_attention as K

    g = torch.Generator().manual_seed(0)
    default = K.PROGRAMS
    # rows, heads, latent, rope, nope, cache columns, columns attended
    for b, nh, C, DR, DN, cols, W in [(3, 4, 32, 16, 8, 40, 37), (1, 16, 64, 16, 16, 64, 64), (2, 20, 32, 16, 8, 33, 33)]:
        q = torch.randn(b, nh, DN + DR + 3, generator=g)[:, :, : DN + DR]
        kv = torch.randn(b, C + DR + 5, generator=g)[:, : C + DR]
        weight = torch.randn(C, generator=g)
        angle = torch.randn(b, DR // 2, generator=g)
        freqs = torch.view_as_real(torch.polar(torch.full_like(angle, 0.9), angle))  # DeepSeek scales its freqs_cis
        lat, rope = torch.randn(b + 2, cols, C, generator=g), torch.randn(b + 2, cols, DR, generator=g)
        write = torch.randint(0, W, (b,), generator=g)
        got_lat, got_rope, want_lat, want_rope = lat.clone(), rope.clone(), lat.clone(), rope.clone()
        q_pe = K.prologue(q, kv, weight, 1e-6, freqs, got_lat, got_rope, write, DN)
        want = K.prologue_reference(q, kv, weight, 1e-6, freqs, want_lat, want_rope, write, DN)
        torch.testing.assert_close(q_pe, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_lat, want_lat, rtol=1e-5, atol=1e-5)  # the rows' columns, and nothing else
        torch.testing.assert_close(got_rope, want_rope, rtol=1e-5, atol=1e-5)
        assert not torch.equal(got_lat, lat) and not torch.equal(got_rope, rope)
        q_lat = torch.randn(nh, b, C, generator=g)
        causal = torch.arange(W)[None, :] <= write[:, None]
        holes = causal & (torch.rand(b, W, generator=g) > 0.3)
        holes[:, 0] = True
        for mask in (causal, holes):
            want = K.attend_reference(q_lat, q_pe, got_lat[:b, :W], got_rope[:b, :W], mask, 0.3)
            for programs in (K.PROGRAMS, 1):  # the columns in spans (some wholly masked) added up, or one span a row
                K.PROGRAMS = programs
                got = K.attend(q_lat, q_pe, got_lat[:b, :W], got_rope[:b, :W], mask, 0.3)
                assert got.shape == (nh, b, C)
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            K.PROGRAMS = default
    # the reference rotary is transformers' DeepSeek-V2 rotary
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb
    x, k = torch.randn(2, 3, 1, 16, generator=g), torch.randn(2, 1, 1, 16, generator=g)
    cis = torch.polar(torch.ones(2, 1, 8), torch.randn(2, 1, 8, generator=g))
    want_q, want_k = apply_rotary_emb(x, k, cis)
    torch.testing.assert_close(K.rotate(x, torch.view_as_real(cis)[:, None]), want_q)
    torch.testing.assert_close(K.rotate(k, torch.view_as_real(cis)[:, None]), want_k)
    print("ok")
""")


def test_mla_decode_kernels_equal_the_torch_ops():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
