"""Dynamic batching: concurrent requests for different adapters run in one batch, each as if alone."""
from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from dsft.errors import NotFoundError
from dsft.runtime.engine import Engine, Request


def test_concurrent_requests_for_different_adapters_batch_together(attached, texts):
    engine = Engine(attached, max_batch_size=16, max_wait_s=0.2, quiet_s=None)  # the whole wait: threads start slowly here
    try:
        adapters = ["finance", "legal", "medical", None] * 3
        prompts = [texts[i % len(texts)] for i in range(len(adapters))]
        results: list = [None] * len(adapters)

        def ask(i: int) -> None:
            results[i] = engine.generate(Request(adapter=adapters[i], prompt=prompts[i], max_new_tokens=8, ignore_eos=True))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(adapters))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert max(n for n, _ in engine.batches) > 1 and engine.counts["mixed"] >= 1
        for prompt, adapter, got in zip(prompts, adapters, results):
            want = attached.generate(prompt, adapter=adapter, max_new_tokens=8, ignore_eos=True)
            assert got.token_ids == want.token_ids
    finally:
        engine.close()


def test_a_bad_request_fails_alone_and_the_engine_keeps_serving(attached, texts):
    engine = Engine(attached, max_wait_s=0.05)
    try:
        with pytest.raises(NotFoundError, match="astrology"):  # resolved when submitted, before it is queued
            engine.submit(Request(adapter="astrology", prompt=texts[0]), lambda kind, payload: None)
        events = []
        engine.submit(Request(adapter="finance", prompt=texts[0], max_new_tokens=0), lambda *e: events.append(e))
        good = engine.generate(Request(adapter="finance", prompt=texts[0], max_new_tokens=4, ignore_eos=True))
        assert len(good.token_ids) == 4
        assert events and events[0][0] == "error" and "max_new_tokens" in str(events[0][1])
    finally:
        engine.close()


def test_a_row_that_fails_in_its_batch_fails_alone(attached, texts, monkeypatch):
    from dsft.runtime import generation

    real = generation.sample_row

    def poisoned(scores, row):  # a fault injected into one row's sampling, mid-batch
        if row.seed == 13:
            raise RuntimeError("probability tensor contains inf or nan")
        return real(scores, row)

    monkeypatch.setattr(generation, "sample_row", poisoned)
    adapters = ["finance", "legal", "medical", None, "finance", "legal"]
    seeds = [None, None, 13, None, None, None]  # the poisoned row samples; the others are greedy (comparable)
    engine = Engine(attached, max_batch_size=16, max_wait_s=0.5, quiet_s=None)
    try:
        futures = [Future() for _ in seeds]

        def listener(i):
            def on_event(kind, payload):
                if kind in ("done", "error"):
                    futures[i].set_result((kind, payload))
            return on_event

        for i, (adapter, seed) in enumerate(zip(adapters, seeds)):
            engine.submit(Request(adapter=adapter, prompt=texts[i % len(texts)], max_new_tokens=6,
                                  temperature=0.8 if seed else 0.0, seed=seed, ignore_eos=True), listener(i))
        outcomes = [f.result(timeout=120) for f in futures]
        assert engine.batches[-1][0] == 6, "the six requests should have run as one batch"
        assert [kind for kind, _ in outcomes] == ["done", "done", "error", "done", "done", "done"]
        assert "inf or nan" in str(outcomes[2][1]) and engine.counts["failed"] == 1
        for i, (kind, gen) in enumerate(outcomes):
            if kind == "done":
                want = attached.generate(texts[i % len(texts)], adapter=adapters[i], max_new_tokens=6, ignore_eos=True)
                assert gen.token_ids == want.token_ids
    finally:
        engine.close()


def test_requests_beyond_the_kv_budget_wait_for_room_and_one_too_large_alone_is_refused(attached, texts):
    from dsft.runtime.records import ContextLengthError

    short = dict(max_new_tokens=6, ignore_eos=True, raw=True)
    prompt_len = len(attached.encode(texts[1], "legal", raw=True))
    # A budget that holds one short request's cache (1 slot x 64 columns) but not two (2 slots).
    one = attached.batch().kv_bytes_for([prompt_len + short["max_new_tokens"]])
    assert one and attached.batch().kv_bytes_for([prompt_len + 6] * 2) == 2 * one
    engine = Engine(attached, max_batch_size=8, max_wait_s=0.2, kv_memory_gib=one / 2**30)
    try:
        results: list = [None] * 3

        def ask(i: int) -> None:
            results[i] = engine.generate(Request(adapter=["legal", "finance", None][i], prompt=texts[1], **short))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        # All three were served, one at a time: each waited for the one before to leave the cache.
        assert engine.counts["largest"] == 1 and engine.counts["held"] >= 1 and engine.counts["batches"] == 3
        for adapter, got in zip(["legal", "finance", None], results):
            assert got.token_ids == attached.generate(texts[1], adapter=adapter, **short).token_ids
        # A request that alone needs more than the budget (more columns) is refused, naming the budget.
        with pytest.raises(ContextLengthError, match="GiB of KV cache.*--kv-memory"):
            engine.generate(Request(adapter="legal", prompt=texts[1], max_new_tokens=80, ignore_eos=True, raw=True))
        assert engine.generate(Request(adapter="legal", prompt=texts[1], **short)).token_ids == results[0].token_ids
    finally:
        engine.close()


def test_a_lone_request_does_not_sit_out_the_batch_wait_and_a_burst_still_batches(attached, texts):
    import time

    engine = Engine(attached, max_batch_size=16, max_wait_s=2.0, quiet_s=0.05)
    try:
        started: list[float] = []

        def on_event(kind, payload):
            if kind == "started":
                started.append(time.monotonic())
        t0 = time.monotonic()
        done = Future()
        engine.submit(Request(adapter="finance", prompt=texts[0], max_new_tokens=2, ignore_eos=True),
                      lambda kind, payload: (on_event(kind, payload), kind in ("done", "error") and done.set_result(kind)))
        assert done.result(60) == "done"
        assert started[0] - t0 < 1.0, "a lone request waited for company it could not get (max_wait_s is 2 s)"
        # Requests submitted back to back arrive well within the quiet window: one admission.
        results = [Future() for _ in range(4)]
        for i, fut in enumerate(results):
            engine.submit(Request(adapter=["legal", None][i % 2], prompt=texts[1], max_new_tokens=2, ignore_eos=True),
                          lambda kind, payload, fut=fut: kind in ("done", "error") and fut.set_result(kind))
        assert [f.result(60) for f in results] == ["done"] * 4
        assert engine.batches[-1][0] == 4
    finally:
        engine.close()


def test_a_server_warms_the_engine_up_on_every_resident_adapter_and_starts_with_clean_counts(attached, refs):
    pytest.importorskip("fastapi")
    from dsft.serve.server import warm_engine

    engine = Engine(attached, max_batch_size=8)
    ran: list = []
    real_step = attached.step
    try:
        attached.step = lambda batch, new_rows=(): (ran.extend(r.key for r in new_rows), real_step(batch, new_rows))[1]
        seconds = warm_engine(engine, ["finance", "legal"])
        assert seconds > 0 and sorted(ran, key=str) == sorted([None, refs["finance"], refs["legal"]], key=str)
        assert engine.counts["rows"] == 0 and engine.counts["steps"] == 0 and not engine.batches
        with pytest.raises(NotFoundError, match="astrology"):  # a server that cannot serve an adapter does not start
            warm_engine(engine, ["astrology"])
    finally:
        del attached.step
        engine.close()
