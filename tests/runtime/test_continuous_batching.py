"""Continuous batching: requests join and leave the running batch at token boundaries, each getting what it
gets alone; a short request does not wait for a long one; a cancelled request frees its slot at once."""
from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import pytest

import dsft
from dsft.runtime.engine import Engine, Request

TIMEOUT = 120


@dataclass
class Ask:
    adapter: str | None
    prompt: str
    max_new_tokens: int
    join: int
    """The step (token boundary) at which the request joins the running batch."""
    temperature: float = 0.0
    seed: int | None = None


def run_continuously(runtime, asks: list[Ask], prefill_chunk: int | None = None, overlap: bool = False,
                     prefill_graphs: bool | str | None = None):
    """Drive one running batch step by step, each ask joining at its step; returns the rows (in ask order) and
    (step, running rows before it, rows that joined, rows that left, tokens of each row after it) for every step.
    ``overlap``: each step is launched before the previous one's tokens are read (as on a GPU); ``prefill_graphs``:
    "buckets" prefills whole prompts over a prefill graph's bucketed inputs, run eagerly."""
    rows = [runtime.make_row(runtime.encode(a.prompt, a.adapter, raw=True), runtime.resolve(a.adapter),
                             max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed, ignore_eos=True)
            for a in asks]
    batch, log, step = runtime.batch(prefill_chunk=prefill_chunk, overlap=overlap, prefill_graphs=prefill_graphs), [], 0
    while step <= max(a.join for a in asks) or len(batch):
        running = len(batch)
        new = [r for r, a in zip(rows, asks) if a.join == step]
        left = runtime.step(batch, new)
        log.append((step, running, len(new), len(left), [len(r.tokens) for r in rows]))
        step += 1
    if prefill_graphs:  # every admission went through a bucket
        assert batch.prefill is not None and batch.prefill.prefills == len({a.join for a in asks})
    return rows, log


def alone(runtime, ask: Ask):
    return runtime.generate(ask.prompt, adapter=ask.adapter, raw=True, max_new_tokens=ask.max_new_tokens,
                            temperature=ask.temperature, seed=ask.seed, ignore_eos=True).token_ids


def check_each_row_as_alone(runtime, asks: list[Ask], prefill_chunk: int | None = None, overlap: bool = False,
                            prefill_graphs: bool | str | None = None) -> None:
    rows, log = run_continuously(runtime, asks, prefill_chunk, overlap, prefill_graphs)
    # Requests really joined rows that were running and left while others went on.
    assert any(running and joined for _, running, joined, _, _ in log), log
    assert any(left and running > left for _, running, _, left, _ in log), log
    assert max(running for _, running, _, _, _ in log) >= 3, log
    for ask, row in zip(asks, rows):
        assert row.error is None and row.finish_reason == "length" and len(row.tokens) == ask.max_new_tokens
        assert row.tokens == alone(runtime, ask), ask


@pytest.mark.parametrize("overlap,prefill", [(False, None), (True, None), (True, "buckets")],
                         ids=["read-each-step", "overlapped", "overlapped-prefill-buckets"])
def test_rows_joining_and_leaving_a_deepseek_mla_batch_get_what_they_get_alone(attached, texts, overlap, prefill):
    """``prefill-buckets``: prompts prefilled as a prefill graph computes them (left-padded to the bucket, an
    explicit mask), on CPU; the tokens are still each row's alone."""
    asks = [
        Ask("finance", texts[0], 20, join=0),
        Ask(None, texts[3], 5, join=0),
        Ask("legal", texts[1], 9, join=2),   # joins two running rows, with a shorter prompt
        Ask("medical", texts[2] + " and the", 4, join=3),  # a longer prompt than the running rows have seen
        Ask("legal", texts[1], 8, join=5, temperature=0.9, seed=11),  # seeded sampling: same tokens whatever joins
        Ask("finance", texts[3], 6, join=12),  # joins after the short ones left (the cache was trimmed)
    ]
    check_each_row_as_alone(attached, asks, overlap=overlap, prefill_graphs=prefill)


@pytest.mark.parametrize("overlap", [False, True], ids=["read-each-step", "overlapped"])
def test_a_long_prompt_prefilled_in_chunks_joins_while_the_running_rows_keep_decoding(attached, texts, overlap):
    long_prompt = " ".join(texts)  # 7 chunks of 4 tokens, one per step
    asks = [Ask("legal", texts[1], 14, join=0), Ask(None, texts[3], 12, join=0),
            Ask("finance", long_prompt, 6, join=1), Ask("medical", texts[2], 5, join=3)]
    rows, log = run_continuously(attached, asks, prefill_chunk=4, overlap=overlap)
    for ask, row in zip(asks, rows):
        assert row.tokens == alone(attached, ask), ask
    # The long prompt took a step per chunk to read (its first token came with the last chunk), and the
    # rows that were running got a token at every one of those steps.
    chunks = -(-len(attached.encode(long_prompt, "finance", raw=True)) // 4)
    first = next(step for step, *_, tokens in log if tokens[2])
    assert chunks >= 5 and first == 1 + chunks - 1
    assert [log[s][4][0] - log[s - 1][4][0] for s in range(2, first + 1)] == [1] * (first - 1)


def test_a_row_evicted_while_its_prompt_is_read_leaves_the_others_exact(attached, texts):
    asks = [Ask("legal", texts[1], 10, join=0), Ask("finance", " ".join(texts), 4, join=1),
            Ask(None, " ".join(texts[1:]), 5, join=1)]
    rows = [attached.make_row(attached.encode(a.prompt, a.adapter, raw=True), attached.resolve(a.adapter),
                              max_new_tokens=a.max_new_tokens, ignore_eos=True) for a in asks]
    batch = attached.batch(prefill_chunk=4)
    attached.step(batch, rows[:1])
    attached.step(batch, rows[1:])  # both long prompts are being read, a chunk per step
    assert not rows[1].tokens and not rows[2].tokens and len(batch) == 3
    assert batch.evict(lambda row: RuntimeError("gone") if row is rows[1] else None) == [rows[1]]
    while len(batch):
        attached.step(batch)
    assert rows[1].finish_reason == "error" and "gone" in str(rows[1].error)
    for ask, row in zip(asks, rows):
        if row is not rows[1]:
            assert row.tokens == alone(attached, ask), ask


@pytest.fixture(scope="module")
def qwen3(rt_home):
    """tiny-qwen3-moe (full attention, GQA) with one LoRA + terms adapter."""
    from dsft.base import load_base
    from dsft.testing.adapters import make_adapter

    ref = make_adapter(load_base("tiny-qwen3-moe", device="cpu"), "qwdemo", seed=5,
                       terms=["collateralized debt obligation", "habeas corpus"]).ref
    runtime = dsft.load_base("tiny-qwen3-moe", device="cpu")
    runtime.attach(ref)
    return runtime


@pytest.mark.parametrize("prefill", [None, "buckets"], ids=["prefill-as-it-comes", "prefill-buckets"])
def test_rows_joining_and_leaving_a_qwen3_moe_batch_get_what_they_get_alone(qwen3, texts, prefill):
    asks = [
        Ask("qwdemo", texts[0], 16, join=0),
        Ask(None, texts[1], 4, join=1),
        Ask("qwdemo", texts[2], 7, join=2),
        Ask(None, texts[3], 6, join=4, temperature=0.8, seed=3),
        Ask("qwdemo", texts[1], 5, join=9),
    ]
    check_each_row_as_alone(qwen3, asks, overlap=True, prefill_graphs=prefill)


def test_overlapped_steps_end_rows_at_an_eos_or_a_stop_string_as_reading_each_step_does(attached, texts):
    """Overlapped, the host learns a row ended one step late: the token computed meanwhile is dropped, and
    the rows around it are not disturbed."""
    reference = alone(attached, Ask("finance", texts[0], 12, join=0))
    eos, stop = reference[4], attached.tokenizer_for("legal").decode(alone(attached, Ask("legal", texts[1], 6, join=0))[2:4])

    def rows():
        return [attached.make_row(attached.encode(texts[0], attached.resolve("finance"), raw=True),
                                  attached.resolve("finance"), max_new_tokens=12),
                attached.make_row(attached.encode(texts[1], attached.resolve("legal"), raw=True),
                                  attached.resolve("legal"), max_new_tokens=30, stop=[stop], ignore_eos=True),
                attached.make_row(attached.encode(texts[3], None, raw=True), None, max_new_tokens=9, ignore_eos=True)]

    got = {}
    for overlap in (False, True):
        batch, made, launched = attached.batch(overlap=overlap), rows(), []
        forward = batch.slots.forward
        batch.slots.forward = lambda *a, **k: launched.append(len(a[1])) or forward(*a, **k)
        made[0].eos_ids = frozenset({eos})
        attached.step(batch, made)
        while len(batch):
            attached.step(batch)
        got[overlap] = ([(r.tokens, r.text, r.finish_reason) for r in made], launched)
    assert got[True][0] == got[False][0]
    assert [why for *_, why in got[True][0]] == ["stop", "stop", "length"]
    assert got[True][0][0][0] == reference[:4], "the row ended at its eos token, which is not kept"
    # The rows that stopped had one more token computed (dropped); the last row ends by length, which is
    # foreseen: no step is launched for nothing at the end.
    assert len(got[True][1]) == len(got[False][1]) and sum(got[True][1]) == sum(got[False][1]) + 2


class Events:
    """Collects one request's engine events; ``done`` resolves with (kind, payload) of its last one."""

    def __init__(self, name: str, order: list):
        self.name, self.order, self.texts = name, order, []
        self.done: Future = Future()
        self.first_text = threading.Event()

    def __call__(self, kind, payload):
        self.order.append((self.name, kind))
        if kind == "text":
            self.texts.append(payload)
            self.first_text.set()
        elif kind in ("done", "error"):
            self.done.set_result((kind, payload))


def test_a_short_request_finishes_before_a_long_one_that_was_running(attached, texts):
    engine = Engine(attached, max_batch_size=8, max_wait_s=0.0)
    try:
        order: list = []
        long, short = Events("long", order), Events("short", order)
        engine.submit(Request(adapter="finance", prompt=texts[0], raw=True, max_new_tokens=120, ignore_eos=True,
                              stream=True), long)
        assert long.first_text.wait(TIMEOUT)
        engine.submit(Request(adapter="legal", prompt=texts[1], raw=True, max_new_tokens=4, ignore_eos=True), short)
        kind, got = short.done.result(TIMEOUT)
        assert kind == "done" and len(got.token_ids) == 4
        assert not long.done.done(), "the short request should not have waited for the long one"
        assert long.done.result(TIMEOUT)[1].token_ids == attached.generate(
            texts[0], adapter="finance", raw=True, max_new_tokens=120, ignore_eos=True).token_ids
        assert engine.counts["largest"] == 2 and engine.counts["batches"] == 2
    finally:
        engine.close()


def test_a_cancelled_request_frees_its_slot_at_the_next_token(attached, texts):
    engine = Engine(attached, max_batch_size=1, max_wait_s=0.0)
    try:
        order: list = []
        first, second = Events("first", order), Events("second", order)
        ticket = engine.submit(Request(adapter="medical", prompt=texts[2], raw=True, max_new_tokens=500,
                                       ignore_eos=True, stream=True), first)
        assert first.first_text.wait(TIMEOUT)
        engine.submit(Request(adapter="legal", prompt=texts[1], raw=True, max_new_tokens=3, ignore_eos=True), second)
        time.sleep(0.05)  # the second request waits: the one slot is taken
        assert ("second", "started") not in order
        steps = engine.counts["steps"]
        ticket.cancel()
        kind, got = first.done.result(TIMEOUT)
        assert kind == "done" and got.finish_reason == "cancelled" and len(got.token_ids) < 500
        assert second.done.result(TIMEOUT)[0] == "done"
        # The slot was free at the next token: the second request started right after the first left.
        assert order.index(("second", "started")) == order.index(("first", "done")) + 1
        assert engine.counts["steps"] - steps <= 3 + 2 and engine.counts["cancelled"] >= 1
    finally:
        engine.close()


def test_a_row_whose_adapter_is_detached_mid_generation_fails_alone(attached, refs, texts):
    attached.attach(refs["finance2"])
    engine = Engine(attached, max_batch_size=4, max_wait_s=0.2)
    try:
        order: list = []
        doomed, other = Events("doomed", order), Events("other", order)
        engine.submit(Request(adapter=refs["finance2"], prompt=texts[0], raw=True, max_new_tokens=400,
                              ignore_eos=True, stream=True), doomed)
        engine.submit(Request(adapter="legal", prompt=texts[1], raw=True, max_new_tokens=40, ignore_eos=True), other)
        assert doomed.first_text.wait(TIMEOUT)
        attached.detach(refs["finance2"])  # between two steps: the engine holds the lock per step only
        kind, exc = doomed.done.result(TIMEOUT)
        assert kind == "error" and "detached while this request was generating" in str(exc)
        kind, got = other.done.result(TIMEOUT)
        assert kind == "done" and got.token_ids == attached.generate(
            texts[1], adapter="legal", raw=True, max_new_tokens=40, ignore_eos=True).token_ids
    finally:
        engine.close()
        if refs["finance2"] in attached.adapters:
            attached.detach(refs["finance2"])
