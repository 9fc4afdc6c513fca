"""A prefill over a graph's bucketed inputs computes what the prefill of the prompts as they come computes: the last
position's logits and every prompt token's keys and values (what the rows join the running batch with)."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from dsft.runtime.generation import left_pad
from dsft.runtime.kv_cache import cache_kwarg
from dsft.runtime.multilora import MultiLora
from dsft.runtime.prefill_graphs import MIN_PREFILL_WIDTH, PrefillGraphs, prefill_graphs_wanted, to_drop
from dsft.runtime.row_groups import RowGroups


def test_bucketed_prefill_equals_the_prefill_as_it_comes(attached, texts):
    keys = ["finance", None, "legal", "medical", "finance"]  # 5 rows: a bucket of 8, three rows of padding
    prompts = [attached.encode(t, k, raw=True) for t, k in zip(texts + texts[:1], keys)]
    prompts[4] = prompts[4][:3]  # a short one: most of its width is padding
    batch = attached.batch(prefill_graphs="buckets")
    lora: MultiLora = batch.lora
    handles = [attached.resolve(k) for k in keys]
    keys = [h and h.key for h in handles]
    ids, mask = left_pad([batch.table.to_global(p, k) for p, k in zip(prompts, keys)], batch.pad_id, batch.device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    plain = DynamicCache(config=attached.model.config)
    with torch.inference_mode(), lora.rows(RowGroups.of(keys, batch.device)):
        want = batch.model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwarg(batch.model, plain),
                           use_cache=True, logits_to_keep=1).logits[:, -1]
    assert batch.prefill is not None and not batch.prefill.graphs_on  # on CPU: the graph's inputs, run eagerly
    got, cache = batch.prefill.forward(ids, mask, keys)
    assert got.shape == want.shape and cache.layers[0].keys.shape[0] == len(prompts)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    width = cache.layers[0].keys.shape[2]
    assert width >= MIN_PREFILL_WIDTH and width & (width - 1) == 0  # the bucket's width, right-aligned
    for mine, theirs in zip(cache.layers, plain.layers, strict=True):
        for i, p in enumerate(prompts):  # each prompt token's keys and values (padding columns are the rows' own)
            torch.testing.assert_close(mine.keys[i, :, -len(p):], theirs.keys[i, :, -len(p):], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(mine.values[i, :, -len(p):], theirs.values[i, :, -len(p):], rtol=1e-4, atol=1e-4)
    assert batch.prefill.prefills == 1


def test_graphs_are_on_where_decode_is_graphed_and_large_prefills_stay_as_they_come(attached, monkeypatch):
    import dsft.runtime.prefill_graphs as pg

    assert not prefill_graphs_wanted(attached.model)  # a CPU model: never
    assert attached.batch().prefill is None  # and not asked for
    monkeypatch.setattr(pg, "graphs_wanted", lambda model: True)  # as on a GPU in bf16
    monkeypatch.delenv("DSFT_PREFILL_GRAPHS", raising=False)
    assert prefill_graphs_wanted(attached.model)
    monkeypatch.setenv("DSFT_PREFILL_GRAPHS", "0")  # the switch to compare or debug
    assert not prefill_graphs_wanted(attached.model)
    assert PrefillGraphs.fits(32, 14) and PrefillGraphs.fits(1, 4096) and not PrefillGraphs.fits(32, 512)


def test_graphs_past_the_memory_bound_go_least_recently_used_first():
    held = [("a", 300), ("b", 200), ("c", 100)]  # oldest use first
    assert to_drop(held, 100, 1000) == []            # 700 fits
    assert to_drop(held, 500, 1000) == ["a"]         # 1100 -> 800
    assert to_drop(held, 800, 1000) == ["a", "b"]    # 1400 -> 900
    assert to_drop(held, 2000, 1000) == ["a", "b", "c"]  # past the bound alone: all go, it still runs
    assert to_drop([], 2000, 1000) == []


def test_a_bucket_used_again_becomes_the_most_recent(attached, texts):
    batch = attached.batch(prefill_graphs="buckets")
    prefill = batch.prefill
    assert prefill is not None
    first = batch.table.to_global(attached.encode(texts[0], None, raw=True), None)[0]

    def run(rows: int, length: int) -> None:
        row = torch.tensor([first] * length, device=batch.device)
        prefill.forward(row.repeat(rows, 1), torch.ones(rows, length, dtype=torch.bool), [None] * rows)

    for rows, length in [(1, 5), (2, 9), (1, 3), (1, 20)]:  # buckets (1, 16), (2, 16), (1, 16) again, (1, 32)
        run(rows, length)
    assert list(prefill._buckets) == [(2, 16), (1, 16), (1, 32)] and prefill.prefills == 4
    assert prefill.held_bytes() == 0  # run eagerly (no graphs on a CPU), a bucket keeps no keys or values
