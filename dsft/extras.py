"""Optional dependencies (``pip install 'dsft[serve]'``, ``'dsft[qlora]'``, ``'dsft[lmeval]'``): import one or say how to get it.

``dsft train --domain finance`` needs none of them; a command that does asks here first, so a user
without the extra reads one line naming it instead of a ModuleNotFoundError traceback.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from dsft.errors import UsageError

EXTRAS = {"serve": ("fastapi", "uvicorn", "prometheus_client"), "qlora": ("bitsandbytes",), "lmeval": ("lm_eval",)}
"""extra -> the modules it provides (kept equal to ``[project.optional-dependencies]`` in pyproject.toml)."""


def require(extra: str, what: str) -> list[ModuleType]:
    """Import the modules of ``extra``.

    Args:
        extra: a key of :data:`EXTRAS`.
        what: what needs them, for the message (e.g. ``dsft serve``).
    Returns:
        The imported modules, in the order of :data:`EXTRAS`.
    Raises:
        UsageError: one is not installed; the message names it and the pip command.
    """
    modules = []
    for name in EXTRAS[extra]:
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            raise UsageError(f"{what} needs {name}, which is not installed: pip install 'dsft[{extra}]'") from None
    return modules
