"""Refs are parsed by closed grammars: anything path-like, empty, overlong or SQL-ish is a UsageError."""
from __future__ import annotations

import pytest

from dsft.errors import UsageError
from dsft.registry import Ref, parse_ref, validate_domain, validate_tag, validate_version


@pytest.mark.parametrize("text, ref", [
    ("finance", Ref("finance")),
    ("finance@latest", Ref("finance")),
    ("finance@0.2.0", Ref("finance", version="0.2.0")),
    ("finance@1.0.0-rc.1", Ref("finance", version="1.0.0-rc.1")),
    ("finance@production", Ref("finance", tag="production")),
    ("legal-us_2@Staging.v2", Ref("legal-us_2", tag="Staging.v2")),
    ("a" * 64 + "@" + "T" * 64, Ref("a" * 64, tag="T" * 64)),
])
def test_valid_refs(text: str, ref: Ref) -> None:
    assert parse_ref(text) == ref
    assert str(parse_ref(text)) == text.removesuffix("@latest")


@pytest.mark.parametrize("text", [
    "", "@", "finance@", "@0.1.0",
    "fin/ance", "finance/../legal", "..", "../finance", "finance@../0.1.0", "finance@0.1.0/..", "fin\\ance",
    "a" * 65, "finance@" + "t" * 65, "finance@1.0.0-" + "a" * 60,
    "finance'; DROP TABLE adapters;--", "finance@x' OR '1'='1", 'fin"ance', "finance;", "finance%", "fin_%",
    "Finance", "1finance", "_finance", " finance", "finance ", "finance\n", "fin ance", "finance@@prod",
    "finance@prod@x", "finance@01.2.0", "finance@1.2", "finance@1.2.0.0", "finance@1.2.0+build",
    "finance@-prod", "financé", "finance@١.٢.٣", "finance\x00",
])
def test_bad_refs_are_usage_errors(text: str) -> None:
    with pytest.raises(UsageError) as err:
        parse_ref(text)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 400
    assert "DOMAIN@" in msg or "version" in msg or "empty" in msg


def test_error_names_the_ref_and_the_rule() -> None:
    with pytest.raises(UsageError, match=r"bad adapter ref 'fin/ance': the domain must be 1-64 characters"):
        parse_ref("fin/ance")


@pytest.mark.parametrize("fn, good, bad", [
    (validate_domain, ["finance", "a", "x" * 64, "legal-us_2"], ["", "A", "x" * 65, "a/b", "a.b", "..", "a b"]),
    (validate_tag, ["production", "Staging", "v1.2", "a" * 64], ["", "1a", "latest", "a/b", "a" * 65, "a b", "a'b"]),
    (validate_version, ["0.1.0", "10.20.30", "1.0.0-alpha.1"], ["", "v1.0.0", "1.0", "01.0.0", "1.0.0+b", "1.0.0-"]),
])
def test_validators(fn, good: list[str], bad: list[str]) -> None:
    for name in good:
        assert fn(name) == name
    for name in bad:
        with pytest.raises(UsageError):
            fn(name)
