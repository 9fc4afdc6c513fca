"""Base models: presets, resolution/loading, the per-architecture table and fingerprints."""
from dsft.base.arch import ARCHITECTURES, ArchSpec, spec_for
from dsft.base.loading import BaseRef, LoadedBase, fingerprint_for, load_base, resolve_base
from dsft.base.presets import DEFAULT_BASE, PRESETS, build_preset

__all__ = [
    "ARCHITECTURES", "ArchSpec", "spec_for", "BaseRef", "LoadedBase", "fingerprint_for", "load_base",
    "resolve_base", "DEFAULT_BASE", "PRESETS", "build_preset",
]
