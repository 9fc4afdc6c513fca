"""The residency budget on its own (a stand-in runtime with adapters of known sizes): the memory budget evicts
the least recently used adapters until the rest fit, never a pinned one; what cannot be made to fit is refused
and not left attached."""
from __future__ import annotations

import pytest

from dsft.errors import NotFoundError, UsageError
from dsft.runtime.records import AdapterInfo
from dsft.runtime.refs import AdapterHandle
from dsft.serve.residency import Budget, BudgetFull, Residency

MiB = 2**20


class FakeRuntime:
    """Attach/detach/resolve by full ref; each adapter's size is given."""

    name = "base"

    def __init__(self, sizes: dict[str, int]):
        self.sizes = sizes
        self.adapters: dict[str, AdapterInfo] = {}

    def attach(self, ref: str) -> AdapterInfo:
        if ref not in self.sizes:
            raise NotFoundError(f"no adapter {ref}")
        domain, version = ref.split("@")
        info = AdapterInfo(domain, version, "/x", "verified", 0, None, self.sizes[ref])
        self.adapters[ref] = info
        return info

    def detach(self, ref: str) -> AdapterInfo:
        if ref not in self.adapters:
            raise NotFoundError(ref)
        return self.adapters.pop(ref)

    def memory(self) -> dict[str, int]:
        return {k: a.nbytes for k, a in self.adapters.items()}

    def resolve(self, model):
        if model is None or model == self.name:
            return None
        if model not in self.adapters:
            raise NotFoundError(f"{model} is not attached")
        return AdapterHandle(*model.split("@"))


def test_the_memory_budget_evicts_least_recently_used_adapters_until_the_new_one_fits():
    rt = FakeRuntime({"a@1": 40 * MiB, "b@1": 40 * MiB, "c@1": 40 * MiB, "big@1": 90 * MiB})
    res = Residency(rt, Budget(max_bytes=100 * MiB))  # type: ignore[arg-type]
    res.attach("a@1")
    res.attach("b@1")
    res.release(res.acquire("a@1"))  # a used after b: b is the least recent
    res.attach("c@1")
    assert sorted(rt.adapters) == ["a@1", "c@1"] and res.evictions == 1
    res.attach("big@1")  # 90 MiB: both others must go
    assert list(rt.adapters) == ["big@1"]
    assert [a["ref"] for a in res.resident()] == ["big@1"] and res.resident()[0]["bytes"] == 90 * MiB


def test_what_cannot_fit_is_refused_and_not_left_attached():
    rt = FakeRuntime({"a@1": 60 * MiB, "b@1": 60 * MiB, "huge@1": 200 * MiB})
    res = Residency(rt, Budget(max_adapters=2, max_bytes=100 * MiB))  # type: ignore[arg-type]
    res.attach("a@1")
    handle = res.acquire("a@1")  # a request is using a
    with pytest.raises(BudgetFull, match="in use .*a@1"):
        res.attach("b@1")
    assert list(rt.adapters) == ["a@1"]
    res.release(handle)
    with pytest.raises(UsageError, match="over the adapter memory budget"):
        res.attach("huge@1")
    assert list(rt.adapters) == ["a@1"]  # nothing was evicted for it
    res.attach("b@1")  # a is free now: evicted for b
    assert list(rt.adapters) == ["b@1"]
