"""generate() keeps one idle batch between calls (on a GPU: its CUDA graphs and KV slots), gives it to one caller
at a time, and drops it when it can no longer be valid; a close during a generate fails its rows cleanly."""
from __future__ import annotations

import functools
import threading
from concurrent.futures import Future

import pytest

import dsft
from dsft.runtime.records import RuntimeClosedError
from tests.runtime.conftest import in_background

TIMEOUT = 120


def _count_batches(runtime, monkeypatch) -> list:
    """Every batch ``runtime`` makes from now on (run() makes one only when it has no idle one to take)."""
    made, real = [], runtime.batch

    def batch(**kwargs):
        made.append(real(**kwargs))
        return made[-1]
    monkeypatch.setattr(runtime, "batch", batch)
    return made


def _alone(alone, prompts, adapters, **ask):
    return [alone[a].generate(p, adapter=a, **ask).token_ids for p, a in zip(prompts, adapters, strict=True)]


def test_consecutive_generates_reuse_one_batch_and_give_the_same_tokens(attached, alone, texts, monkeypatch):
    with attached._lock:
        attached._idle_batch = None  # whatever earlier tests left: this test counts from a fresh batch
    made = _count_batches(attached, monkeypatch)
    mixed = ["finance", "legal", "medical", None]
    ask = dict(max_new_tokens=12, ignore_eos=True)
    first = attached.generate(texts, adapters=mixed, **ask)
    assert len(made) == 1 and attached._idle_batch is made[0]
    slots = made[0].slots
    assert slots is not None and slots.cache.allocated
    # A smaller request (fewer rows, more tokens: the kept cache grows along one dimension) on the kept batch.
    second = attached.generate(texts[1], adapter="legal", max_new_tokens=30, ignore_eos=True)
    third = attached.generate(texts, adapters=mixed, **ask)
    assert len(made) == 1, "a generate() made a new batch although one was idle"
    assert attached._idle_batch is made[0] and attached._idle_batch.slots is slots
    assert [g.token_ids for g in third] == [g.token_ids for g in first] == _alone(alone, texts, mixed, **ask)
    assert second.token_ids == alone["legal"].generate(texts[1], adapter="legal", max_new_tokens=30,
                                                        ignore_eos=True).token_ids
    # A batch made under other settings (a benchmark turns overlap or CUDA graphs off between two calls) is not reused.
    monkeypatch.setenv("DSFT_OVERLAP", "0")
    attached.generate(texts[1], adapter="legal", max_new_tokens=2)
    assert len(made) == 2 and attached._idle_batch is made[1]


def test_a_batch_that_ran_while_adapters_changed_is_not_kept(attached, refs, texts, monkeypatch):
    """On a GPU a detach after its last forward would leave its graphs holding the detached adapter's factors."""
    used, real_step = [], attached.step

    def step(batch, new_rows=()):
        used.append(batch)
        return real_step(batch, new_rows)
    monkeypatch.setattr(attached, "step", step)
    started = threading.Event()
    thread = threading.Thread(target=attached.generate, args=(texts[1],), daemon=True,
                              kwargs=dict(adapter="legal", max_new_tokens=200, ignore_eos=True,
                                          on_text=lambda *_: started.set()))
    thread.start()
    try:
        assert started.wait(TIMEOUT)
        attached.attach(refs["finance2"])
        thread.join(TIMEOUT)
        assert not thread.is_alive()
        assert used and attached._idle_batch is not used[-1]
    finally:
        thread.join(TIMEOUT)
        if refs["finance2"] in attached.adapters:
            attached.detach(refs["finance2"])


def test_concurrent_generates_each_take_a_batch_of_their_own(attached, alone, texts, monkeypatch):
    attached.generate(texts[3], max_new_tokens=2)  # an idle batch to take: the first caller gets it
    idle = attached._idle_batch
    assert idle is not None
    used: dict[str, set[int]] = {"a": set(), "b": set()}
    real_step = attached.step

    def step(batch, new_rows=()):
        used[threading.current_thread().name].add(id(batch))
        return real_step(batch, new_rows)
    monkeypatch.setattr(attached, "step", step)
    a_started = threading.Event()
    asks = {"a": dict(prompt=texts[0], adapter="finance", max_new_tokens=120, ignore_eos=True),
            "b": dict(prompt=texts[1], adapter="legal", max_new_tokens=40, ignore_eos=True)}
    answers = {"a": Future(), "b": Future()}

    def work(name):
        ask = dict(asks[name])
        try:
            if name == "b":  # starts while a is generating (a holds the idle batch)
                assert a_started.wait(TIMEOUT)
            answers[name].set_result(attached.generate(ask.pop("prompt"), on_text=lambda *_: a_started.set(), **ask))
        except BaseException as exc:  # handed to the test below
            answers[name].set_exception(exc)

    threads = [threading.Thread(target=work, args=(n,), name=n, daemon=True) for n in ("a", "b")]
    for t in threads:
        t.start()
    got = {n: answers[n].result(TIMEOUT) for n in ("a", "b")}
    for t in threads:
        t.join(TIMEOUT)
    assert used["a"] == {id(idle)}, "the first caller should take the idle batch"
    assert len(used["b"]) == 1 and not used["a"] & used["b"], "two concurrent generate() calls shared a batch"
    for name in ("a", "b"):
        ask = dict(asks[name])
        want = alone[ask["adapter"]].generate(ask.pop("prompt"), **ask).token_ids
        assert got[name].token_ids == want, name
    assert attached._idle_batch is not None  # one of them was kept


@pytest.mark.parametrize("shape", ["default", "graph-shaped"])
def test_a_batch_kept_across_an_attach_gives_what_a_fresh_runtime_gives(refs, alone, texts, shape, monkeypatch):
    """graph-shaped: the kept batch pads steps to the graphs' buckets and overlaps them, as on a GPU (whose
    graphs are keyed by the adapters' version, which the attach moves)."""
    base = dsft.load_base("tiny-deepseek-v2", device="cpu")
    try:
        if shape == "graph-shaped":
            monkeypatch.setattr(base, "batch", functools.partial(base.batch, buckets=True, overlap=True))
        ask = dict(max_new_tokens=16, ignore_eos=True)
        base.attach(refs["finance"])
        before = base.generate(texts[0], adapter="finance", **ask)
        kept = base._idle_batch
        assert kept is not None
        base.attach(refs["legal"])  # its terms extend the term table: every row's layout is recomputed
        after = base.generate(texts[:3], adapters=["finance", "legal", None], **ask)
        assert base._idle_batch is kept, "an attach between two generate() calls should keep the batch"
        assert before.token_ids == after[0].token_ids
        assert [g.token_ids for g in after] == _alone(alone, texts[:3], ["finance", "legal", None], **ask)
        base.detach("legal")
        assert base._idle_batch is None, "a detach drops the idle batch (its graphs hold the adapters' factors)"
        assert base.generate(texts[0], adapter="finance", **ask).token_ids == before.token_ids
    finally:
        base.close()
    assert base._idle_batch is None


def test_close_during_a_generate_fails_its_rows_with_a_clear_error(refs, alone, texts):
    base = dsft.load_base("tiny-deepseek-v2", device="cpu")  # its own runtime: the shared ones stay open
    base.attach(refs["finance"])
    started = threading.Event()
    # The plain-base row first: generate() raises the first failed row's error, and only the guard stops a
    # row without an adapter (close() detaches finance, which fails the other row anyway).
    prompts, adapters = [texts[3], texts[0]], [None, "finance"]
    answer, thread = in_background(base.generate, prompts, adapters=adapters, max_new_tokens=300, ignore_eos=True,
                                   on_text=lambda *_: started.set())
    try:
        assert started.wait(TIMEOUT)
        base.close()  # between two steps
        thread.join(TIMEOUT)
        assert not thread.is_alive(), "generate() did not end after close()"
        with pytest.raises(RuntimeClosedError, match="the runtime was closed while this request was generating"):
            answer.result(0)
        assert base._idle_batch is None
        # A request after the close installs the tables again, on a new batch.
        again = base.generate(texts[3], max_new_tokens=6, ignore_eos=True)
        assert again.token_ids == alone[None].generate(texts[3], max_new_tokens=6, ignore_eos=True).token_ids
        assert base._idle_batch is not None
        base.close()  # nothing attached now: close itself drops the idle batch
        assert base._idle_batch is None
    finally:
        thread.join(TIMEOUT)
        base.close()


def test_rows_of_a_closed_runtimes_batch_fail_alone_new_ones_included(refs, texts):
    base = dsft.load_base("tiny-deepseek-v2", device="cpu")
    try:
        base.attach(refs["finance"])
        batch = base.batch()
        running = base.make_row(base.encode(texts[0], "finance", raw=True), base.resolve("finance"),
                                max_new_tokens=50, ignore_eos=True)
        assert base.step(batch, [running]) == []
        base.close()
        late = base.make_row(base.encode(texts[3], None, raw=True), None, max_new_tokens=5)
        gone = base.step(batch, [late])
        assert {id(r) for r in gone} == {id(running), id(late)} and len(batch) == 0
        for row in gone:
            assert row.finish_reason == "error" and isinstance(row.error, RuntimeClosedError)
        assert "tokens in" in str(running.error)
    finally:
        base.close()
