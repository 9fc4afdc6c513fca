"""``dsft generate``, ``serve`` and ``eval`` refuse settings no request could run with in one line, before loading a
base (seconds to minutes of work, and a server that would refuse every request)."""
from __future__ import annotations

import pytest
from security_helpers import one_error_line


@pytest.fixture
def no_loading(monkeypatch):
    import dsft.runtime.base

    def load_base(*_a, **_k):
        raise AssertionError("a base was loaded before the arguments were checked")

    monkeypatch.setattr(dsft.runtime.base, "load_base", load_base)


@pytest.mark.parametrize("args, message", [
    (["--temperature", "1e-45"], "--temperature must be 0 (greedy) or >= 0.01"),
    (["--temperature", "0.7", "--seed", str(2**64)], "--seed must be an integer from 0 to 2**64-1"),
    (["--temperature", "0.7", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
], ids=["tiny-temperature", "huge-seed", "zero-top-p"])
def test_generate_checks_sampling_before_loading(dsft, no_loading, args, message):
    line = one_error_line(dsft("generate", *args, "What is EBITDA?"))
    assert message in line


def test_serve_refuses_max_tokens_0_before_loading(dsft, no_loading):
    line = one_error_line(dsft("serve", "--max-tokens", "0"))
    assert "--max-tokens must be >= 1, got 0" in line


@pytest.mark.parametrize("command", [["generate", "hi"], ["serve"], ["eval", "--adapter", "finance"],
                                     ["export", "finance", "--format", "merged", "--out", "x"]],
                         ids=["generate", "serve", "eval", "export-merged"])
def test_an_unknown_device_is_refused_before_loading(dsft, no_loading, command):
    line = one_error_line(dsft(*command, "--device", "quantum"))
    assert "--device must be cpu, cuda or cuda:N, got 'quantum'" in line


@pytest.mark.parametrize("command", [["serve"], ["ui"]])
def test_listening_on_every_interface_needs_an_api_key(dsft, no_loading, monkeypatch, command):
    """A wildcard bind cannot check the Host header against one address (DNS rebinding): a key is the guard."""
    monkeypatch.delenv("DSFT_API_KEY", raising=False)
    line = one_error_line(dsft(*command, "--host", "0.0.0.0"))
    assert "--host 0.0.0.0 listens on every interface: set DSFT_API_KEY" in line
