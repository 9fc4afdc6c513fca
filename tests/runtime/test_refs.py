"""Which attached version a request means, tags cached with a lifetime, and the limits every row is checked against."""
from __future__ import annotations

import pytest

from dsft.errors import UsageError
from dsft.runtime.generation import MIN_TEMPERATURE, check_sampling
from dsft.runtime.refs import AdapterHandle, TagCache, pick_version


def test_a_bare_domain_means_the_tagged_version_when_attached_else_the_newest():
    assert pick_version(["0.2.0", "0.10.0", "0.9.1"], None) == "0.10.0"
    assert pick_version(["0.2.0", "0.10.0"], "0.2.0") == "0.2.0"
    assert pick_version(["0.2.0", "0.10.0"], "0.3.0") == "0.10.0"  # tagged, but not attached here
    assert pick_version(["1.0.0-rc.1", "1.0.0"], None) == "1.0.0"
    assert AdapterHandle("finance", "0.1.0").ref == "finance@0.1.0"


def test_tags_are_looked_up_once_per_lifetime_and_again_after_invalidate():
    now, calls, points = [0.0], [], {"production": "0.1.0"}

    def lookup(domain, tag):
        calls.append((domain, tag))
        return points.get(tag)

    cache = TagCache(lookup, ttl_s=2.0, clock=lambda: now[0])
    assert cache.version("finance", "production") == "0.1.0" and cache.version("finance", "nightly") is None
    points["production"] = "0.2.0"
    now[0] = 1.5
    assert cache.version("finance", "production") == "0.1.0" and len(calls) == 2  # cached, no lookup
    now[0] = 2.5
    assert cache.version("finance", "production") == "0.2.0" and len(calls) == 3  # expired
    points["production"] = "0.3.0"
    cache.invalidate()
    assert cache.version("finance", "production") == "0.3.0" and len(calls) == 4


@pytest.mark.parametrize("settings,field", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"temperature": 1e-45}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"seed": 2**64}, "seed"),
    ({"seed": -1}, "seed"),
])
def test_limits_no_row_can_run_with_are_refused_naming_the_setting(settings, field):
    args = {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": None, **settings}
    with pytest.raises(UsageError, match=field):
        check_sampling(**args)
    check_sampling(max_new_tokens=1, temperature=MIN_TEMPERATURE, top_p=1.0, seed=2**64 - 1)
