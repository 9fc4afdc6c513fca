"""Base models: presets, resolution/loading, the per-architecture table and fingerprints.

Imports are lazy so that the CLI's help and the registry do not pay for torch.
"""
from __future__ import annotations

from typing import Any

from dsft.base.arch import ARCHITECTURES, ArchSpec, spec_for
from dsft.base.presets import DEFAULT_BASE, PRESETS, build_preset

_LOADING = {"BaseRef", "LoadedBase", "base_architecture", "fingerprint_for", "load_base", "resolve_base"}
__all__ = ["ARCHITECTURES", "ArchSpec", "spec_for", "DEFAULT_BASE", "PRESETS", "build_preset", *sorted(_LOADING)]


def __getattr__(name: str) -> Any:
    if name in _LOADING:
        from dsft.base import loading

        return getattr(loading, name)
    raise AttributeError(name)
