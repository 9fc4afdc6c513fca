"""Registry files: a zero-byte registry.db is damage (never a new registry)."""
from __future__ import annotations

from security_helpers import one_error_line


def test_a_zero_byte_registry_is_refused_untouched(dsft, home):
    (home / "registry.db").write_bytes(b"")
    line = one_error_line(dsft("registry", "list"))
    assert "empty file (0 bytes)" in line and "left untouched" in line
    assert (home / "registry.db").read_bytes() == b""
