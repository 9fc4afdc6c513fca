"""Packing examples into shared rows: best-fit, the row layout, and losses equal to unpacked on every MoE family."""
from __future__ import annotations

import random

import pytest
import torch
import transformers

from dsft.base.presets import PRESETS
from dsft.data.packing import (
    IGNORE,
    Sequences,
    best_fit,
    model_inputs,
    pack_rows,
    padding_share,
    row_lengths,
    segment_ids,
)
from dsft.eval.losses import causal_lm_loss, heldout_loss, lm_loss
from dsft.kernels.varlen import VARLEN, register

VOCAB = 400


# --- best fit ----------------------------------------------------------------------------------


def test_best_fit_puts_each_example_where_it_leaves_the_least_room():
    rows = best_fit([6, 5, 4, 3, 2], capacity=10)

    assert rows == [[0, 2], [1, 3, 4]]  # 6+4 fills a row; 5+3+2 the next


def test_best_fit_keeps_every_example_once_and_respects_capacity():
    lengths = [random.Random(i).randint(1, 64) for i in range(500)]

    rows = best_fit(lengths, capacity=64, window=100)

    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(lengths[i] for i in r) <= 64 for r in rows)
    assert rows == best_fit(lengths, capacity=64, window=100)  # deterministic
    with pytest.raises(ValueError, match="example 0 has 65 tokens"):
        best_fit([65], capacity=64)


def test_padding_is_under_three_percent_on_an_sft_like_length_distribution():
    rng = random.Random(0)
    seq_len = 4096
    # lognormal lengths: median ~300 tokens, a long tail cut at seq_len (as real SFT sets)
    lengths = [min(seq_len, max(8, int(rng.lognormvariate(5.7, 0.9)))) for _ in range(20_000)]

    rows = best_fit(lengths, seq_len)

    pad = 1 - sum(lengths) / (len(rows) * seq_len)
    assert pad < 0.03, pad


# --- row layout --------------------------------------------------------------------------------


def test_pack_rows_restarts_positions_per_example_and_masks_each_first_token():
    seqs = Sequences.from_lists([([5, 6, 7], [5, 6, 7]), ([8, 9], [IGNORE, 9])])

    row = pack_rows(seqs.example, [[0, 1]], seq_len=8, pad_id=1)

    assert row["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 1, 1]]
    assert row["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, 9, IGNORE, IGNORE, IGNORE]]
    assert row["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert row["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0]]
    assert segment_ids(row["position_ids"]).tolist() == [[0, 0, 0, 1, 1, 2, 2, 2]]
    assert padding_share(row["attention_mask"]) == 3 / 8
    assert seqs.targets().tolist() == [2, 1]


# --- packed loss == unpacked loss --------------------------------------------------------------


def _extra_configs() -> dict[str, object]:
    return {
        "deepseek-v3": transformers.DeepseekV3Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=16,
            q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=2, topk_group=1,
            num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=128),
        "qwen2-moe": transformers.Qwen2MoeConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
            shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            num_experts=8, num_experts_per_tok=2, max_position_embeddings=128),
        "olmoe": transformers.OlmoeConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, max_position_embeddings=128),
    }


def _configs() -> dict[str, object]:
    tiny = {p.name: p.make_config(VOCAB) for p in PRESETS.values() if p.cpu_ok}
    return {**tiny, **_extra_configs()}


MODELS = sorted(_configs())
CASES = [(name, "sdpa") for name in MODELS] + [("tiny-deepseek-v2", "eager"), ("tiny-qwen3-moe", "eager"),
                                               ("tiny-deepseek-v2", "flex_attention"),  # what dsft trains with on a GPU:
                                               ("tiny-deepseek-v2", VARLEN)]  # (CPU: its SDPA reference, same wiring)


def _model(name: str, attn: str):
    config = _configs()[name]
    config._attn_implementation = "sdpa"
    if attn == VARLEN:
        register()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # router weights large enough that tokens route differently
        for n, p in model.named_parameters():
            if n.endswith(("mlp.gate.weight", "router.weight", "block_sparse_moe.gate.weight")) or "proj.bias" in n:
                p.normal_(0, 0.3)
    model.set_attn_implementation(attn)
    return model.eval()


def _examples(seed: int = 0) -> Sequences:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in (7, 13, 5, 21, 9, 3, 16):
        ids = torch.randint(2, VOCAB, (n,), generator=g).tolist()
        prompt = n // 3  # prompt positions take no loss, as in instruction records
        rows.append((ids, [IGNORE] * prompt + ids[prompt:]))
    return Sequences.from_lists(rows)


@pytest.mark.parametrize(("name", "attn"), CASES)
def test_packed_loss_per_example_equals_unpacked_loss(name, attn):
    model = _model(name, attn)
    seqs = _examples()
    seq_len = 32
    rows = best_fit(seqs.lengths.tolist(), seq_len)
    packed = pack_rows(seqs.example, rows, seq_len, pad_id=1)
    assert len(rows) < len(seqs)  # several examples share a row

    got = heldout_loss(model, packed)

    alone, alone_tokens = [], []
    model.set_attn_implementation("sdpa")  # the oracle: each example alone (flex would compile for every length)
    with torch.no_grad():
        for i in (i for r in rows for i in r):  # examples in packed order
            ids, labels = (t[None] for t in seqs.example(i))
            logits = model(input_ids=ids, use_cache=False).logits
            alone.append(float(causal_lm_loss(logits, labels, reduction="sum")))
            alone_tokens.append(int((labels[:, 1:] != IGNORE).sum()))
    assert got["per_example_tokens"] == alone_tokens
    assert got["per_example"] == pytest.approx(alone, rel=1e-5, abs=1e-5)

    model.set_attn_implementation(attn)
    with torch.no_grad():  # (flex attention has no backward on CPU; the GPU run is in benchmarks/results)
        # the training loss: labelled positions only, chunked head
        train = lm_loss(model, {**packed, "seq_lens": row_lengths(packed["position_ids"])} if attn == VARLEN else packed)
    assert train.item() == pytest.approx(sum(alone) / sum(alone_tokens), rel=1e-5)


def test_labelled_positions_only_loss_matches_the_full_head_and_its_gradient():
    model = _model("tiny-deepseek-v2", "sdpa")
    seqs = _examples(1)
    packed = pack_rows(seqs.example, best_fit(seqs.lengths.tolist(), 32), 32, pad_id=1)

    fast = lm_loss(model, packed, chunk_size=8)
    fast.backward()
    grad_fast = model.lm_head.weight.grad.clone()
    model.zero_grad()
    full = causal_lm_loss(model(**model_inputs(packed), use_cache=False).logits, packed["labels"])
    full.backward()

    assert float(fast) == pytest.approx(float(full), rel=1e-6)
    torch.testing.assert_close(grad_fast, model.lm_head.weight.grad, rtol=1e-5, atol=1e-7)


def test_heldout_loss_is_the_same_with_a_forward_per_row_and_the_head_in_small_chunks(monkeypatch):
    """Long GPU-sized rows are measured a few rows per forward and a few thousand logits at a time; the
    figures do not depend on how the work is cut."""
    import dsft.eval.losses as losses

    model = _model(*CASES[0])
    seqs = _examples()
    rows = best_fit(seqs.lengths.tolist(), 32)
    packed = pack_rows(seqs.example, rows, 32, pad_id=1)
    whole = heldout_loss(model, packed)
    monkeypatch.setattr(losses, "EVAL_TOKENS", 40)  # one 32-position row per forward
    monkeypatch.setattr(losses, "HEAD_CHUNK", 7)
    cut = heldout_loss(model, packed)
    assert cut["tokens"] == whole["tokens"]
    assert cut["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert cut["per_example"] == pytest.approx(whole["per_example"], rel=1e-6)
