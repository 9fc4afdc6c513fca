"""An OpenAI-compatible HTTP server over the runtime (:mod:`dsft.runtime`): ``dsft serve``."""
from __future__ import annotations

from typing import Any

__all__ = ["Limits", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in ("Limits", "create_app"):
        from dsft.serve import app

        return getattr(app, name)
    if name == "serve":
        from dsft.serve.server import serve

        return serve
    raise AttributeError(name)
