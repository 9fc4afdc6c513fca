"""``registry check`` re-hashes the adapter's files: a tampered adapter is refused, as generate, serve, export
and verify refuse it, never called ``verified`` from what the registry recorded about the original."""
from __future__ import annotations

import json

import pytest
from security_helpers import one_error_line

from dsft.errors import IntegrityError


def _flip(path, n: int = 4) -> None:
    """Flip ``n`` bytes in the middle of ``path`` (tensor data, past the safetensors header): same size, new hash."""
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + n] = bytes(b ^ 0xFF for b in data[mid:mid + n])
    path.write_bytes(bytes(data))


def test_check_refuses_a_tampered_adapter_in_one_line(dsft, home, tiny_base_dir, monkeypatch):
    import importlib

    from dsft.base import fingerprint_for, load_base
    from dsft.registry import open_registry
    from dsft.testing.adapters import make_adapter

    rec = make_adapter(load_base("tiny-deepseek-v2", device="cpu"), "finance", seed=1)
    ok = dsft("registry", "check", rec.ref, "--base", "tiny-deepseek-v2", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["status"] == "verified", ok.stdout + ok.stderr
    fp = fingerprint_for("tiny-deepseek-v2")[2]

    weights = home / "adapters" / "finance" / rec.version / "adapter_model.safetensors"
    _flip(weights)

    def never(*_a, **_k):
        raise AssertionError("the base was fingerprinted for an adapter whose files do not match")

    monkeypatch.setattr(importlib.import_module("dsft.base.fingerprint"), "compute_fingerprint", never)
    for args in ((), ("--json",)):
        proc = dsft("registry", "check", rec.ref, "--base", "tiny-deepseek-v2", *args)
        line = one_error_line(proc)
        assert proc.returncode == IntegrityError.exit_code and proc.stdout == ""
        assert line.startswith(f"error: adapter {rec.ref}: {weights}: sha256 ") and "differs from the recorded" in line
        assert line.endswith("restore it, or re-import / retrain the adapter")

    with open_registry() as reg, pytest.raises(IntegrityError, match="adapter_model.safetensors: sha256"):
        reg.check(rec.ref, base_fingerprint=fp)  # the Python API refuses it too
