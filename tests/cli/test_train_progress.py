"""What `dsft train` prints while it runs: the kept layers' line says whether their attention recomputes its inputs
(the event comes only from a GPU run, so the view is fed it here)."""
from __future__ import annotations

from dsft.cli import train_cmd


def _printed(monkeypatch, payload: dict) -> str:
    lines: list[str] = []
    monkeypatch.setattr(train_cmd.err_console, "print", lambda text, **kw: lines.append(str(text)))
    train_cmd._ProgressView(quiet=False)("recompute", payload)
    return " ".join(lines)


def test_the_kept_layers_line_says_what_backward_recomputes(monkeypatch):
    plain = _printed(monkeypatch, {"kept_layers": 16, "layers": 27, "attention_recomputed": False})
    assert "the last 16 of 27 layers keep their activations (no recompute;" in plain
    lean = _printed(monkeypatch, {"kept_layers": 22, "layers": 27, "attention_recomputed": True})
    assert "the last 22 of 27 layers keep their activations (all but attention's query, key and value" in lean
    assert _printed(monkeypatch, {"kept_layers": 0, "layers": 27, "attention_recomputed": False}) == ""
