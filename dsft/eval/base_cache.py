"""Held-out losses of an unmodified base, kept on disk: the base is measured once per (base version, held-out
rows), not again by every run, ``dsft eval`` and ``--compare`` that needs its figures.

The key is the base's fingerprint with the dtype, device type and quantisation it ran in, the evaluation batch
size, and the sha256 of the rows' tensors; the value is :func:`dsft.eval.losses.heldout_loss`'s result as
JSON (floats round-trip exactly). Only callers that hold the base itself (no adapter, no added terms) use it.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import torch

from dsft.atomic import write_json_atomic
from dsft.home import dsft_home

CACHE_DIR = ("cache", "base-heldout")


def base_key(fingerprint_id: str, model, quantized: bool = False) -> str:
    """What the base's losses depend on besides the rows: its version and how it runs."""
    p = next(model.parameters())
    return f"{fingerprint_id}|{p.dtype}|{p.device.type}|nf4={quantized}"


def _rows_digest(examples: Mapping[str, torch.Tensor | None], batch_size: int) -> str:
    h = hashlib.sha256(f"batch={batch_size}".encode())
    for name in sorted(examples):
        t = examples[name]
        if t is None:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def cached_base_loss(key: str | None, examples: Mapping[str, torch.Tensor | None], batch_size: int,
                     compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``compute()``'s result for these rows, from the cache when ``key`` (see :func:`base_key`) has it; no key: compute."""
    if key is None:
        return compute()
    digest = hashlib.sha256(f"{key}|{_rows_digest(examples, batch_size)}".encode()).hexdigest()
    path = dsft_home().joinpath(*CACHE_DIR, f"{digest}.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or unreadable: measure again (and rewrite it)
        pass
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, result)
    return result
