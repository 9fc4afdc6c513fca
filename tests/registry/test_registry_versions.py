"""Version rules: SemVer precedence, minor bump on retrain, major bump when the base's architecture or
tokenizer changes, and directories left by killed runs are skipped."""
from __future__ import annotations

import pytest

from dsft.registry.versions import Version, bump_kind, latest, next_version, sort_versions

FP = {"architecture": "DeepseekV2ForCausalLM", "tokenizer_hash": "t1", "weights_hash": "w1"}


def test_semver_precedence() -> None:
    order = ["0.1.0", "0.2.0", "0.10.0", "1.0.0-alpha", "1.0.0-alpha.1", "1.0.0-alpha.beta", "1.0.0-beta.2",
             "1.0.0-beta.11", "1.0.0-rc.1", "1.0.0", "2.0.0"]
    assert sort_versions(reversed(order)) == order
    assert latest(order) == "2.0.0"
    assert latest([]) is None
    assert str(Version.parse("1.0.0-rc.1")) == "1.0.0-rc.1"


@pytest.mark.parametrize("new, kind", [
    ({**FP, "weights_hash": "w2"}, "minor"),                   # same arch and tokenizer: a retrain
    ({**FP, "tokenizer_hash": "t2"}, "major"),
    ({**FP, "architecture": "Qwen3MoeForCausalLM"}, "major"),
    (None, "minor"),                                            # unknown base: never guess a major
])
def test_bump_kind(new, kind: str) -> None:
    assert bump_kind(FP, new) == kind


def test_next_version() -> None:
    assert next_version([], None, FP) == "0.1.0"
    assert next_version(["0.1.0"], FP, FP) == "0.2.0"
    assert next_version(["0.1.0", "0.2.0"], FP, {**FP, "tokenizer_hash": "t2"}) == "1.0.0"
    assert next_version(["0.9.0", "0.10.0"], FP, FP) == "0.11.0"
    assert next_version(["1.0.0-rc.1"], FP, FP) == "1.1.0"
    # a directory left by a killed registration is never reused
    assert next_version(["0.1.0"], FP, FP, taken=["0.2.0"]) == "0.3.0"
    assert next_version([], None, FP, taken=["0.1.0"]) == "0.2.0"
