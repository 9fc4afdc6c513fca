"""Dynamic batching: concurrent requests for different adapters run in one batch, each as if alone."""
from __future__ import annotations

import threading

import pytest

from dsft.errors import NotFoundError
from dsft.runtime.engine import Engine, Request


def test_concurrent_requests_for_different_adapters_batch_together(attached, texts):
    engine = Engine(attached, max_batch_size=16, max_wait_s=0.2)
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
        events = []
        engine.submit(Request(adapter="astrology", prompt=texts[0]), lambda kind, payload: events.append((kind, payload)))
        good = engine.generate(Request(adapter="finance", prompt=texts[0], max_new_tokens=4, ignore_eos=True))
        assert len(good.token_ids) == 4
        assert events and events[0][0] == "error" and isinstance(events[0][1], NotFoundError)
        with pytest.raises(NotFoundError):
            engine.generate(Request(adapter="astrology", prompt="x"))
    finally:
        engine.close()
