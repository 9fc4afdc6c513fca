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


def _info(ref):
    from dsft.runtime.records import AdapterInfo

    domain, version = ref.split("@")
    return AdapterInfo(domain, version, f"/adapters/{domain}/{version}", "verified", 0, None, 0)


def test_a_request_names_an_attached_version_by_version_tag_or_domain():
    from dsft.errors import NotFoundError
    from dsft.runtime.refs import resolve_attached

    attached = [_info("finance@0.1.0"), _info("finance@0.2.0"), _info("legal@0.1.0")]
    tags = {("finance", "production"): "0.1.0", ("finance", "canary"): "0.3.0"}
    asked = []
    cache = TagCache(lambda d, t: asked.append((d, t)) or tags.get((d, t)))

    def name(adapter):
        return resolve_attached(adapter, "tiny-deepseek-v2", attached, cache).ref

    assert name("finance@0.2.0") == "finance@0.2.0" and name("legal") == "legal@0.1.0"
    assert asked == []  # a version, or a domain with one version attached, needs no tag
    assert name("finance") == "finance@0.1.0" and name("finance@production") == "finance@0.1.0"
    assert name("finance@latest") == "finance@0.2.0"
    assert asked == [("finance", "production")]  # looked up once, then cached
    for missing in ("finance@0.3.0", "finance@canary", "medical", "Qwen/Qwen3-30B-A3B"):
        with pytest.raises(NotFoundError, match="attached: finance@0.1.0, finance@0.2.0, legal@0.1.0"):
            name(missing)
