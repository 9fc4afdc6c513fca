"""Run time: one loaded base, several domain adapters attached, swapped and mixed per request.

    base = dsft.load_base("tiny-deepseek-v2")      # a RuntimeBase
    base.attach("finance")                       # its production tag, else its newest version
    base.generate("What is a collateralized debt obligation?", adapter="finance")   # raw=True: continue text
"""
from __future__ import annotations

from typing import Any

_NAMES = {
    "RuntimeBase": "dsft.runtime.base", "AdapterInfo": "dsft.runtime.records", "Generation": "dsft.runtime.records",
    "load_base": "dsft.runtime.base", "Engine": "dsft.runtime.engine", "AdapterHandle": "dsft.runtime.refs",
}
__all__ = sorted(_NAMES)


def __getattr__(name: str) -> Any:
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(_NAMES[name]), name)
    raise AttributeError(name)
