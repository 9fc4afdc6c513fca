"""Run time: one loaded base, several domain adapters attached, swapped and mixed per request.

    base = dsft.load_base("tiny-deepseek-v2")      # a RuntimeBase
    base.attach("finance@0.1.0")
    base.generate("A collateralized debt obligation is", adapter="finance")
"""
from __future__ import annotations

from typing import Any

_NAMES = {
    "RuntimeBase": "dsft.runtime.base", "AdapterInfo": "dsft.runtime.records", "Generation": "dsft.runtime.records",
    "load_base": "dsft.runtime.base", "Engine": "dsft.runtime.engine",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(name)
