"""DeepSeek-V2's attention absorbed in decode steps (attention over the cached latents, kv_b_proj folded into the
query and the output) computes what transformers' expanded attention computes, with each row's own LoRA on
kv_b_proj, in a batch where rows join and leave; on a GPU its norm, rotary, cache writes and attention run in two
Triton kernels (:mod:`dsft.kernels.mla_attention`), checked here in Triton's interpreter."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dsft.runtime import mla_decode
from tests.runtime.test_continuous_batching import Ask, alone, run_continuously


@pytest.fixture
def count_absorbed(monkeypatch):
    calls = {"absorbed": 0, "with_lora": 0}
    real = mla_decode.absorbed_decode

    def counting(attn, hidden, mask, cache, freqs, lora):
        calls["absorbed"] += 1
        calls["with_lora"] += lora is not None
        return real(attn, hidden, mask, cache, freqs, lora)
    monkeypatch.setattr(mla_decode, "absorbed_decode", counting)
    return calls


def test_a_mixed_batch_decoded_absorbed_gets_what_each_row_gets_alone_expanded(attached, texts, monkeypatch, count_absorbed):
    asks = [
        Ask("finance", texts[0], 12, join=0),
        Ask(None, texts[3], 4, join=0),
        Ask("legal", texts[1], 8, join=2),
        Ask("medical", texts[2] + " and the", 5, join=3),
    ]
    monkeypatch.setattr(mla_decode, "ABSORB_FROM", 0)  # every decode step absorbed
    rows, _ = run_continuously(attached, asks)
    absorbed = dict(count_absorbed)
    monkeypatch.setattr(mla_decode, "ABSORB_FROM", 10**9)  # the references: transformers' expanded attention
    monkeypatch.setattr(mla_decode, "ABSORB_FROM_KERNELS", 10**9)  # (with or without the Triton kernels)
    for ask, row in zip(asks, rows):
        assert row.error is None and row.tokens == alone(attached, ask), ask
    assert count_absorbed == absorbed, "the references ran expanded"
    assert absorbed["absorbed"] > 0 and absorbed["with_lora"] > 0, absorbed


def test_each_absorbed_attention_equals_transformers_expanded_one(attached, texts, monkeypatch):
    """Layer by layer in a mixed decode step (three adapters and the base, so kv_b_proj's LoRA has a row mask):
    the absorbed output against transformers' own forward on the same inputs."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention

    expanded = DeepseekV2Attention.forward
    seen = []

    def compare(attn, hidden, mask, cache, freqs, lora):
        out = real(attn, hidden, mask, cache, freqs, lora)
        want, _ = expanded(attn, hidden, attention_mask=mask, cache=cache, position_embeddings=freqs)  # rewrites the same key
        seen.append((lora is not None and lora[2] is not None, float((out - want).abs().max() / want.abs().max())))
        return out
    real = mla_decode.absorbed_decode
    monkeypatch.setattr(mla_decode, "absorbed_decode", compare)
    monkeypatch.setattr(mla_decode, "ABSORB_FROM", 0)
    rows = [attached.make_row(attached.encode(t, k, raw=True), attached.resolve(k), max_new_tokens=4, ignore_eos=True)
            for t, k in zip(texts, ["finance", "legal", "medical", None])]
    batch = attached.batch()
    attached.step(batch, rows)
    attached.step(batch)
    assert seen and all(masked for masked, _ in seen), "each layer's kv_b_proj LoRA with a per-row mask"
    assert max(err for _, err in seen) < 1e-5, seen
    batch.abandon()


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_forwards_that_are_not_slot_decode_steps_reach_transformers_code_as_called(name):
    """transformers 5.17 passes the cache as ``past_key_values``, later 5.x as ``cache``: a prefill (or any forward
    that is not a decode step over the slot cache) reaches the original forward with exactly its arguments."""
    got = {}

    def original(self, hidden_states, **kwargs):
        got.update(kwargs)
        return "original"
    forward = mla_decode._forward(original, kv_b_lora=None, is_decode=lambda cache, seq: False)
    prefill_cache = object()
    assert forward(None, torch.zeros(2, 5, 8), attention_mask=None, position_embeddings=None, **{name: prefill_cache}) == "original"
    assert got[name] is prefill_cache and set(got) == {"attention_mask", "position_embeddings", name}


IN_KERNELS = textwrap.dedent("""
    import os, sys
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention
    from dsft.kernels import mla_attention
    from dsft.runtime import load_base, mla_decode
    from tests.runtime.conftest import TEXTS
    from tests.runtime.test_continuous_batching import Ask, run_continuously

    base = load_base("tiny-deepseek-v2", device="cpu")
    for ref in sys.argv[1:]:
        base.attach(ref)
    from dsft.kernels import lora_up, mla_absorb, router
    calls = {"prologue": 0, "attend": 0, "greedy_route": 0, "absorb_query": 0, "absorb_output": 0, "swiglu_up": 0}
    owners = {"greedy_route": router, "absorb_query": mla_absorb, "absorb_output": mla_absorb, "swiglu_up": lora_up}
    for name in calls:
        owner = owners.get(name, mla_attention)
        def counted(*args, _real=getattr(owner, name), _name=name):
            calls[_name] += 1
            return _real(*args)
        setattr(owner, name, counted)
    errors = []
    real = mla_decode.absorbed_decode

    def compare(attn, hidden, mask, cache, freqs, lora):  # each layer against transformers' expanded attention
        out = real(attn, hidden, mask, cache, freqs, lora)
        want, _ = DeepseekV2Attention.forward(attn, hidden, attention_mask=mask, cache=cache, position_embeddings=freqs)
        errors.append(float((out - want).abs().max() / want.abs().max()))
        return out
    mla_decode.absorbed_decode = compare
    mla_decode.ABSORB_FROM = 0
    asks = [Ask("finance", TEXTS[0], 6, join=0), Ask(None, TEXTS[3], 3, join=0), Ask("legal", TEXTS[1], 4, join=1),
            Ask("medical", TEXTS[2], 3, join=2)]
    got, _ = run_continuously(base, asks)
    assert calls["prologue"] > 0 and calls["attend"] == calls["prologue"] == len(errors), (calls, len(errors))
    assert calls["absorb_query"] == calls["absorb_output"] == len(errors), calls  # kv_b_proj folded in its kernels
    assert calls["swiglu_up"] > 0, calls  # the shared experts' and the dense layer's gate/up LoRA and activation
    assert max(errors) < 1e-5, max(errors)
    os.environ["DSFT_TRITON_MLA"] = os.environ["DSFT_TRITON_LORA"] = "0"  # the same rows through the torch ops
    swiglu = calls["swiglu_up"]
    want, _ = run_continuously(base, asks)
    assert calls["swiglu_up"] == swiglu, "the torch ops ran the second time"
    assert calls["attend"] == len(errors) - calls["attend"], "the torch ops ran the second time"
    assert [r.tokens for r in got] == [r.tokens for r in want]
    # A kernel that cannot compile for the GPU turns the kernels off for the process; the step goes on in torch ops.
    del os.environ["DSFT_TRITON_MLA"], os.environ["DSFT_TRITON_LORA"]
    def fails(*args):
        raise RuntimeError("no such instruction on this GPU")
    mla_attention.attend = fails
    after, _ = run_continuously(base, asks)
    from dsft.kernels import moe_gemm
    assert not moe_gemm.available() and "no such instruction" in moe_gemm._FAILED
    assert [r.tokens for r in after] == [r.tokens for r in want]
    # the routers ran in their kernels, and close() gives them their forward back
    assert calls["greedy_route"] > 0, calls
    gates = [m for m in base.model.modules() if type(m).__name__ == "DeepseekV2TopkRouter"]
    assert gates and all("forward" in g.__dict__ for g in gates)
    base.close()
    assert not any("forward" in g.__dict__ for g in gates)
    print("ok")
""")


def test_absorbed_steps_in_the_triton_kernels_equal_transformers_attention_and_the_torch_ops(refs, rt_home):
    """The path a GPU takes (four kernels a layer: the prologue, kv_b_proj folded into the query, the attention, and
    kv_b_proj folded into the output), in Triton's interpreter: every layer of a mixed batch's decode
    steps (rows with and without an adapter, joining) equals transformers' expanded attention, and the rows get the
    tokens the torch ops give them; a kernel that fails to compile turns the kernels off and the steps go on; the
    routers run in their kernels (the default) and get their own forward back on close."""
    pytest.importorskip("triton", reason="Triton is part of the test extra (pip install -e '.[test]')")
    env = {**os.environ, "TRITON_INTERPRET": "1", "DSFT_HOME": str(rt_home), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", IN_KERNELS, refs["finance"], refs["legal"], refs["medical"]], env=env,
                          capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
