"""DeepSeek-V2's attention absorbed in decode steps (attention over the cached latents, kv_b_proj folded into the
query and the output) computes what transformers' expanded attention computes, with each row's own LoRA on
kv_b_proj, in a batch where rows join and leave."""
from __future__ import annotations

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
