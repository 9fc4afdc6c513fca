"""``dsft_adapter.json``: what an adapter directory holds, for which base, and the sha256 of every file.

Format (schema_version 1)::

    {"schema_version": 1, "domain": "finance", "version": "0.1.0", "kind": "lora+terms",
     "base": {"name", "source", "fingerprint": {id, architecture, model_type, config_hash,
              tokenizer_hash, weights_hash, vocab_size, tokenizer_size}},
     "target_shapes": {"<base parameter>": [shape]},   # what the adapter modifies
     "added_tokens": ["collateralized debt obligation", ...], "term_start": 4096,
     "base_vocab_size": 4096, "recipe": {...}, "metrics": {...},
     "files": {"adapter_model.safetensors": "<sha256>", ...}}

A newer schema's unknown keys warn; a missing required key fails.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from dsft.atomic import sha256_file
from dsft.errors import IntegrityError

MANIFEST = "dsft_adapter.json"
SCHEMA_VERSION = 1
REQUIRED = ("schema_version", "domain", "version", "kind", "base", "target_shapes", "added_tokens", "files")
KNOWN = set(REQUIRED) | {"term_start", "base_vocab_size", "recipe", "metrics", "created_at", "lora", "trainable_params", "esft"}


def file_hashes(directory: Path, names: list[str]) -> dict[str, str]:
    return {name: sha256_file(directory / name) for name in sorted(names)}


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """Read and structurally check a manifest.

    Raises:
        IntegrityError: no manifest, unreadable JSON, a missing required key or a newer major schema.
    """
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise IntegrityError(f"{directory} is not a dsft adapter (no {MANIFEST}); import plain PEFT adapters with `dsft registry import`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc}); restore it from the registry's copy") from None
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise IntegrityError(f"{path}: missing required key(s) {', '.join(missing)}")
    if manifest["schema_version"] > SCHEMA_VERSION:
        unknown = sorted(set(manifest) - KNOWN)
        if unknown:
            warnings.warn(f"{path}: written by a newer dsft (schema {manifest['schema_version']}); ignoring {unknown}", stacklevel=2)
    return manifest


def verify_files(directory: str | Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists against its sha256.

    Raises:
        IntegrityError: naming the first missing or changed file.
    """
    directory = Path(directory)
    for name, digest in manifest["files"].items():
        path = directory / name
        if not path.exists():
            raise IntegrityError(f"adapter file {path} is missing; re-train or restore the adapter")
        if sha256_file(path) != digest:
            raise IntegrityError(f"adapter file {path} does not match its recorded sha256 (changed or truncated); refusing to load it")
