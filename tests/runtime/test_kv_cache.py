"""Every architecture dsft serves joins rows into a running KV cache exactly: each row's logits at every step
equal its logits alone, and alone they equal a forward over the whole sequence without a cache (small random
models built from their configs, plain base, fp32). The slot cache is checked with exact shapes and with the
CUDA graphs' buckets (rows and width padded to powers of two), and while it grows past its first 64 columns."""
from __future__ import annotations

import pytest
import torch

from dsft.adapters.terms import TermTable
from dsft.runtime import batching
from dsft.runtime.generation import Row
from dsft.runtime.multilora import MultiLora

VOCAB = 300
SMALL = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=256)


def _config(arch: str):
    import transformers as tf

    if arch == "deepseek_v3":
        return tf.DeepseekV3ForCausalLM, tf.DeepseekV3Config(
            **SMALL, intermediate_size=128, moe_intermediate_size=32, num_key_value_heads=4, n_shared_experts=1,
            n_routed_experts=8, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16,
            qk_nope_head_dim=16, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig(
            **SMALL, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            num_key_value_heads=2, num_experts=8, num_experts_per_tok=2)
    if arch == "mixtral":
        return tf.MixtralForCausalLM, tf.MixtralConfig(**SMALL, intermediate_size=64, num_key_value_heads=2,
                                                       num_local_experts=8, num_experts_per_tok=2)
    return tf.OlmoeForCausalLM, tf.OlmoeConfig(**SMALL, intermediate_size=64, num_key_value_heads=4, num_experts=8,
                                               num_experts_per_tok=2, eos_token_id=None, pad_token_id=None)


class _Tokenizer:
    def __len__(self) -> int:
        return VOCAB

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2_moe", "mixtral", "olmoe"])
def test_rows_joining_a_running_cache_compute_what_they_compute_alone(arch, monkeypatch):
    cls, cfg = _config(arch)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    table, lora = TermTable(VOCAB), MultiLora(model, [])
    seen: dict[int, list[torch.Tensor]] = {}
    real = batching.sample

    def spy(logits, rows, widths=None):  # keep each row's logits of every step
        for i, row in enumerate(rows):
            seen.setdefault(row.seed, []).append(logits[i].clone())
        return real(logits, rows, widths)

    monkeypatch.setattr(batching, "sample", spy)
    g = torch.Generator().manual_seed(1)
    # (prompt length, new tokens, step it joins at): joins while others run, different lengths, early leavers,
    # one row longer than the cache's first 64 columns
    plan = [(11, 12, 0), (3, 4, 0), (17, 6, 2), (5, 7, 3), (25, 5, 8), (52, 20, 1)]
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n, _, _ in plan]

    def row(i: int, tag: int) -> Row:  # the seed only names the row here (greedy rows never sample)
        return Row(prompts[i], None, _Tokenizer(), plan[i][1], seed=tag, ignore_eos=True)

    for chunk, buckets in ((None, False), (4, False), (None, True)):
        seen.clear()
        rows = [row(i, i) for i in range(len(plan))]
        batch, step = batching.RunningBatch(model, table, lora, 0, VOCAB, prefill_chunk=chunk, buckets=buckets), 0
        assert batch.joinable
        while step <= plan[-1][2] or len(batch):
            batch.admit([r for r, (_, _, join) in zip(rows, plan) if join == step])
            batch.step()
            step += 1
        for i, r in enumerate(rows):
            solo = row(i, 100 + i)
            batching.run_rows(model, table, lora, [solo], 0, VOCAB)
            assert r.tokens == solo.tokens and len(r.tokens) == plan[i][1]
            for together, alone in zip(seen[i], seen[100 + i], strict=True):
                torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)
    # Alone, every step's logits are those of the whole sequence so far, without a cache.
    for i in range(len(plan)):
        full = torch.tensor([prompts[i] + rows[i].tokens])
        with torch.no_grad():
            want = model(input_ids=full).logits[0, len(prompts[i]) - 1 : -1]
        torch.testing.assert_close(torch.stack(seen[100 + i]), want, rtol=0, atol=1e-4)


def test_a_sliding_window_cache_takes_new_rows_only_into_an_empty_batch():
    import transformers as tf

    model = tf.MixtralForCausalLM(tf.MixtralConfig(**SMALL, intermediate_size=64, num_key_value_heads=2,
                                                   num_local_experts=4, num_experts_per_tok=2, sliding_window=8)).eval()
    batch = batching.RunningBatch(model, TermTable(VOCAB), MultiLora(model, []), 0, VOCAB)
    assert not batch.joinable and batch.can_admit
    batch.admit([Row(list(range(2, 14)), None, _Tokenizer(), 3, ignore_eos=True)])
    assert not batch.can_admit  # the engine waits until the running rows are done
    with pytest.raises(RuntimeError, match="sliding window"):
        batch.admit([Row([5, 6], None, _Tokenizer(), 2)])
    while len(batch):
        batch.step()
    assert batch.can_admit


def test_the_slot_cache_compacts_leaving_rows_and_reallocates_to_what_the_live_rows_need():
    from types import SimpleNamespace

    from dsft.runtime.static_cache import SlotCache

    g = torch.Generator().manual_seed(0)
    # A prefilled DynamicCache's layers: 3 rows right-aligned in 10 columns (lengths 10, 4, 7), 2 layers.
    lengths = [10, 4, 7]
    layers = [SimpleNamespace(keys=torch.randn(3, 1, 10, 8, generator=g), values=torch.randn(3, 2, 10, 5, generator=g))
              for _ in range(2)]
    cache = SlotCache()
    cache.reserve(3, 100, 0)
    assert (cache.slots, cache.columns) == (4, 128)
    cache.allocate_like(layers)
    cache.load(0, layers, lengths)  # all the rows at once, into slots 0..2

    def row_of(slot: int, n: int, layer: int = 1) -> torch.Tensor:
        return cache.values[layer][slot, :, :n]

    for row, n in enumerate(lengths):  # left-aligned: a row's last n columns land at its slot's first n
        for layer in range(2):
            torch.testing.assert_close(row_of(row, n, layer), layers[layer].values[row, :, -n:], rtol=0, atol=0)
            torch.testing.assert_close(cache.keys[layer][row, :, :n], layers[layer].keys[row, :, -n:], rtol=0, atol=0)
        assert not cache.values[1][row, :, n:].any()  # nothing past a row's length (its left padding stays behind)
    cache.keep([0, 2])  # the middle row left: the last moves down, order kept
    torch.testing.assert_close(row_of(1, 7), layers[1].values[2, :, -7:], rtol=0, atol=0)
    generation = cache.generation
    cache.reserve(8, 12, 2)  # more rows, fewer columns than held: reallocated at what is asked
    assert (cache.slots, cache.columns) == (8, 64) and cache.generation == generation + 1
    torch.testing.assert_close(row_of(0, 10), layers[1].values[0], rtol=0, atol=0)
    torch.testing.assert_close(row_of(1, 7), layers[1].values[2, :, -7:], rtol=0, atol=0)
    cache.reserve(2, 30, 2)  # fits: nothing moves
    assert cache.generation == generation + 1
    cache.load(2, layers[:], [4])  # a row joining after two running ones: its slot is the next free one
    torch.testing.assert_close(row_of(2, 4), layers[1].values[0, :, -4:], rtol=0, atol=0)
    torch.testing.assert_close(row_of(1, 7), layers[1].values[2, :, -7:], rtol=0, atol=0)  # the running rows untouched


def test_capturing_warms_up_once_then_records_the_step_and_keeps_what_the_graph_reads(monkeypatch):
    """What dsft's decode and prefill graphs share (:func:`static_cache.capture`), with torch.cuda faked on a CPU:
    the step runs once outside the capture, the row groups' masks are dropped so the graph recomputes them, the
    step runs again under capture in the given pool, and the graph comes back with the captured run's output and
    the adapters' stacked factors it reads."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    from dsft.runtime import static_cache

    events: list[str] = []

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            events.append("wait")

    fake = SimpleNamespace(
        Stream=Stream, current_stream=lambda device=None: Stream(), CUDAGraph=lambda: "graph",
        stream=lambda s: nullcontext(),
        graph=lambda g, pool, stream, capture_error_mode: (events.append(f"capture in {pool}"), nullcontext())[1])
    monkeypatch.setattr(static_cache.torch, "cuda", fake)
    groups = SimpleNamespace(keys=("finance", "legal"), drop_masks=lambda: events.append("drop masks"))
    lora = SimpleNamespace(current_stacks=lambda keys: events.append(f"stacks {keys}") or "stacks")
    runs = iter(["warm-up", "captured"])

    def step():
        events.append("step")
        return next(runs)

    graph, out, stacks = static_cache.capture(step, groups, lora, "cuda:0", "pool")
    assert (graph, out, stacks) == ("graph", "captured", "stacks")
    assert events == ["wait", "step", "drop masks", "stacks ('finance', 'legal')", "capture in pool", "step", "wait"]
    assert static_cache.group_indices(("finance", "legal"), ["legal", None, "finance"], 4).tolist() == [1, -1, 0, -1]


def test_the_cache_goes_by_the_name_the_models_forward_takes():
    from dsft.runtime.kv_cache import cache_kwarg

    class Old(torch.nn.Module):  # transformers 5.17's models
        def forward(self, input_ids=None, past_key_values=None, use_cache=None):
            return past_key_values

    class New(torch.nn.Module):  # from 5.24 (past_key_values deprecated, gone in 5.40)
        def forward(self, input_ids=None, cache=None, use_cache=None):
            return cache

    marker = object()
    assert cache_kwarg(Old(), marker) == {"past_key_values": marker}
    assert cache_kwarg(New(), marker) == {"cache": marker}
    assert New()(**cache_kwarg(New(), marker)) is marker
