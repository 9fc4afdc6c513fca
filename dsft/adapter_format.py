"""The adapter format: file names, kinds, LoRA groups, the domain-name rule and the manifest.

Torch-free and at the bottom floor, so ``registry/`` (which never imports torch) and everything
above it read an adapter the same way. An adapter directory holds::

    adapter_config.json          PEFT's config (plain ``PeftModel.from_pretrained`` reads it)
    adapter_model.safetensors    the LoRA weights
    terms.safetensors            added-token rows {"embed": [n, d], "head": [n, d]} (term extension only)
    esft.safetensors             ESFT adapters instead of the two PEFT files: the trained experts' slices
    recipe.yaml                  the resolved recipe as run
    dsft_adapter.json            the manifest, written last

Manifest (schema_version 2)::

    {"schema_version": 2, "domain": "finance", "version": "0.1.0", "kind": "lora+terms",
     "base": {"name", "source", "fingerprint": {id, architecture, model_type, config_hash,
              tokenizer_hash, weights_hash, vocab_size, tokenizer_size}},
     "target_shapes": {"<base parameter>": [shape]},   # what the adapter modifies
     "added_tokens": ["collateralized debt obligation", ...], "term_start": 4096,
     "base_vocab_size": 4096, "recipe": {...}, "metrics": {...}, "lora": {"r", "alpha"} | "esft": {...},
     "files": {"adapter_model.safetensors": "<sha256>", ...},
     "file_blocks": {"block_bytes": 67108864, "files": {"adapter_model.safetensors": ["<sha256>", ...]}}}

``files`` is each file's identity: the registry, ``dsft registry verify`` and every loader check it.
``file_blocks`` (optional, schema 2) adds the sha256 of each ``block_bytes`` piece (the last one shorter)
of the files larger than one block, so a reader can verify a large file on several cores at once
(:mod:`dsft.runtime.verified_read`); it is written beside ``files`` from the same read of each file.

Schema 2 added ``file_blocks``; a schema 1 manifest is a schema 2 one without it and reads unchanged.
As in PEFT's saved configs: a key written by a newer schema warns and is kept; a missing required key,
an unknown key of this schema (a key added after the manifest's own schema counts as unknown) or a wrong
type fails, naming the dotted field.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dsft.atomic import sha256_file
from dsft.errors import IntegrityError

MANIFEST_FILE = "dsft_adapter.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
TERMS_FILE = "terms.safetensors"
ESFT_FILE = "esft.safetensors"
RECIPE_FILE = "recipe.yaml"
SCHEMA_VERSION = 2
BLOCK_BYTES = 64 << 20
"""Block size of the ``file_blocks`` written here: 900 MB of LoRA factors make 14 blocks, enough for 8 cores."""

LORA_GROUPS = ("attention", "shared_experts", "routed_experts")
"""The module groups LoRA can target (recipes' ``lora``, packs' ``lora_targets``, ``LoraSettings.targets``)."""

LORA, ESFT = "lora", "esft"
TERMS_SUFFIX = "+terms"
KINDS = (LORA, LORA + TERMS_SUFFIX, ESFT, ESFT + TERMS_SUFFIX)
"""The kinds dsft trains; an imported adapter may carry another (its PEFT type, e.g. ``ia3``)."""

DOMAIN_PATTERN = r"[a-z][a-z0-9_-]{0,63}"
DOMAIN_RE = re.compile(DOMAIN_PATTERN, re.ASCII)
DOMAIN_RULE = "1-64 characters of a-z, 0-9, '_' or '-', starting with a letter (e.g. finance)"


def adapter_kind(method: str, *, terms: bool) -> str:
    """The kind recorded for an adapter trained with ``method`` (``lora`` or ``esft``), with or without terms."""
    return method + TERMS_SUFFIX if terms else method


def is_esft(kind: str | None) -> bool:
    """Whether an adapter of ``kind`` replaces expert slices (``esft``, ``esft+terms``) instead of adding PEFT LoRA."""
    return str(kind or LORA).split("+")[0] == ESFT


def _problem(where: str, what: str) -> IntegrityError:
    return IntegrityError(f"{where}: {what}; re-train the adapter or restore its {MANIFEST_FILE}")


@dataclass(frozen=True)
class BaseRef:
    """The base an adapter was trained on; ``source`` and ``fingerprint`` are None for imported adapters."""

    name: str
    source: str | None = None
    fingerprint: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Manifest:
    """The content of ``dsft_adapter.json``; build one with :meth:`from_dict`, write it with :meth:`to_dict`."""

    schema_version: int
    domain: str
    version: str
    kind: str
    base: BaseRef | None
    target_shapes: Mapping[str, list[int]]
    added_tokens: tuple[str, ...]
    files: Mapping[str, str]
    """Relative path -> sha256 of every file of the adapter but the manifest."""
    term_start: int | None = None
    base_vocab_size: int | None = None
    recipe: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] | None = None
    lora: Mapping[str, Any] | None = None
    esft: Mapping[str, Any] | None = None
    trainable_params: int | None = None
    created_at: str | None = None
    imported_from: str | None = None
    file_blocks: Mapping[str, Any] | None = None
    """``{"block_bytes": N, "files": {relative path: [sha256 of each N-byte piece]}}`` (schema 2, optional)."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Keys written by a newer schema, kept so that re-writing the manifest loses nothing."""

    @property
    def is_esft(self) -> bool:
        return is_esft(self.kind)

    @property
    def trained_fingerprint(self) -> Mapping[str, Any] | None:
        """The training base's fingerprint as recorded (None: unknown, e.g. an imported adapter)."""
        fp = self.base.fingerprint if self.base is not None else None
        return fp or None

    def blocks(self, name: str) -> tuple[int, tuple[str, ...]] | None:
        """``(block_bytes, the sha256 of each block)`` of file ``name``, or None when none are recorded."""
        if not self.file_blocks:
            return None
        digests = self.file_blocks["files"].get(name)
        return None if digests is None else (int(self.file_blocks["block_bytes"]), tuple(digests))

    @classmethod
    def from_dict(cls, data: Any, *, where: str = "manifest") -> Manifest:
        """Validate a parsed ``dsft_adapter.json``.

        Args:
            data: the JSON object.
            where: what to name in errors (the file's path).
        Raises:
            IntegrityError: naming the first missing required key, unknown key or wrongly typed field.
        """
        if not isinstance(data, Mapping):
            raise _problem(where, f"must be a JSON object, got {type(data).__name__}")
        missing = [k for k in _REQUIRED if k not in data]
        if missing:
            raise _problem(where, f"missing required key(s) {', '.join(missing)}")
        version = data["schema_version"]
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise _problem(f"{where}: schema_version", f"must be a positive integer, got {version!r}")
        unknown = sorted(k for k in data if k not in _KNOWN or _SINCE.get(k, 1) > version)
        if unknown and version <= SCHEMA_VERSION:
            raise _problem(f"{where}: {unknown[0]}", f"unknown key for schema {version}")
        if unknown:
            warnings.warn(f"{where}: written by a newer dsft (schema {version}); ignoring {unknown}", stacklevel=2)
        values = {k: _check(k, data[k], where) for k in _KNOWN if k in data and k != "base" and k not in unknown}
        blocked = sorted(set((values.get("file_blocks") or {"files": {}})["files"]) - set(values["files"]))
        if blocked:
            raise _problem(f"{where}: file_blocks.files.{blocked[0]}", "lists a file that files does not")
        if values["added_tokens"] and values.get("term_start") is None:
            raise _problem(f"{where}: term_start", "required when added_tokens is not empty (the first added id)")
        return cls(base=_base(data["base"], where), extra={k: data[k] for k in unknown}, **values)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object to write (optional fields that are None are left out, newer keys kept)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                continue
            if f.name == "base":
                value = None if value is None else {"name": value.name, "source": value.source,
                                                     "fingerprint": _plain(value.fingerprint)}
            elif value is None and f.name not in _REQUIRED:
                continue
            out[f.name] = list(value) if f.name == "added_tokens" else _plain(value)
        return {**out, **self.extra}


def _plain(value: Any) -> Any:
    return dict(value) if isinstance(value, Mapping) else value


# key -> (type check, what it must be)
_CHECKS: dict[str, tuple[Any, str]] = {
    "schema_version": (lambda v: isinstance(v, int), "an integer"),
    "domain": (lambda v: isinstance(v, str) and DOMAIN_RE.fullmatch(v), f"a domain name ({DOMAIN_RULE})"),
    "version": (lambda v: isinstance(v, str) and v, "a version string"),
    "kind": (lambda v: isinstance(v, str) and v, "a kind string such as lora+terms"),
    "target_shapes": (lambda v: isinstance(v, Mapping) and all(
        isinstance(s, list) and all(isinstance(d, int) for d in s) for s in v.values()), "an object of integer lists"),
    "added_tokens": (lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v), "a list of strings"),
    "files": (lambda v: isinstance(v, Mapping) and all(isinstance(h, str) for h in v.values()),
              "an object of sha256 strings"),
    "term_start": (lambda v: v is None or (isinstance(v, int) and v >= 0), "a non-negative integer"),
    "base_vocab_size": (lambda v: v is None or (isinstance(v, int) and v > 0), "a positive integer"),
    "recipe": (lambda v: v is None or isinstance(v, Mapping), "an object"),
    "metrics": (lambda v: v is None or isinstance(v, Mapping), "an object"),
    "lora": (lambda v: v is None or isinstance(v, Mapping), "an object"),
    "esft": (lambda v: v is None or isinstance(v, Mapping), "an object"),
    "trainable_params": (lambda v: v is None or isinstance(v, int), "an integer"),
    "created_at": (lambda v: v is None or isinstance(v, str), "a string"),
    "imported_from": (lambda v: v is None or isinstance(v, str), "a string"),
    "file_blocks": (lambda v: v is None or _is_file_blocks(v),
                    'an object {"block_bytes": positive integer, "files": {name: [sha256, ...]}}'),
}
_SINCE = {"file_blocks": 2}
"""Keys added after schema 1 -> the schema that added them (in an older manifest they are unknown keys)."""
_REQUIRED = ("schema_version", "domain", "version", "kind", "base", "target_shapes", "added_tokens", "files")
_KNOWN = frozenset(_CHECKS) | {"base"}


def _is_file_blocks(v: Any) -> bool:
    if not isinstance(v, Mapping) or set(v) != {"block_bytes", "files"}:
        return False
    size, files = v["block_bytes"], v["files"]
    return (isinstance(size, int) and not isinstance(size, bool) and size > 0 and isinstance(files, Mapping)
            and all(isinstance(d, list) and d and all(isinstance(h, str) for h in d) for d in files.values()))


def _check(key: str, value: Any, where: str) -> Any:
    ok, want = _CHECKS[key]
    if isinstance(value, bool) or not ok(value):
        raise _problem(f"{where}: {key}", f"must be {want}, got {str(value)[:60]!r}")
    return tuple(value) if key == "added_tokens" else value


def _base(value: Any, where: str) -> BaseRef | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("name"), str):
        raise _problem(f"{where}: base", "must be an object with a name (or null)")
    source, fp = value.get("source"), value.get("fingerprint")
    if source is not None and not isinstance(source, str):
        raise _problem(f"{where}: base.source", f"must be a string, got {source!r}")
    if fp is not None and not isinstance(fp, Mapping):
        raise _problem(f"{where}: base.fingerprint", "must be an object")
    return BaseRef(value["name"], source, fp)


def read_manifest(directory: str | Path) -> Manifest:
    """Read and check the manifest of the adapter in ``directory``.

    Raises:
        IntegrityError: no manifest, unreadable JSON, or a field that fails :meth:`Manifest.from_dict`.
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.exists():
        raise IntegrityError(f"{directory} is not a dsft adapter (no {MANIFEST_FILE}); "
                             "import plain PEFT adapters with `dsft registry import`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path} is not valid JSON ({getattr(exc, 'msg', exc)}); "
                             "restore it from the registry's copy") from None
    return Manifest.from_dict(data, where=str(path))


def hash_blocks(path: Path, block_bytes: int) -> tuple[str, list[str]]:
    """The sha256 of the file at ``path`` and of each ``block_bytes`` piece of it, from one read."""
    whole, blocks = hashlib.sha256(), []
    with open(path, "rb") as f:
        while block := f.read(block_bytes):
            whole.update(block)
            blocks.append(hashlib.sha256(block).hexdigest())
    return whole.hexdigest(), blocks


def digests(directory: Path, names: Iterable[str], block_bytes: int | None = None) -> dict[str, Any]:
    """The manifest's ``files`` (``{name: sha256}``, sorted by name) of the files ``names`` in ``directory``,
    and its ``file_blocks`` (blocks of ``block_bytes``, default :data:`BLOCK_BYTES`) when one of them is
    larger than a block; no such key otherwise."""
    block_bytes = block_bytes or BLOCK_BYTES
    files, blocks = {}, {}
    for name in sorted(names):
        files[name], pieces = hash_blocks(directory / name, block_bytes)
        if len(pieces) > 1:
            blocks[name] = pieces
    out: dict[str, Any] = {"files": files}
    if blocks:
        out["file_blocks"] = {"block_bytes": block_bytes, "files": blocks}
    return out


def verify_files(directory: str | Path, manifest: Manifest) -> None:
    """Check every file the manifest lists against its sha256.

    Raises:
        IntegrityError: naming the first missing or changed file.
    """
    directory = Path(directory)
    for name, digest in manifest.files.items():
        path = directory / name
        if not path.exists():
            raise IntegrityError(f"adapter file {path} is missing; re-train or restore the adapter")
        if sha256_file(path) != digest:
            raise IntegrityError(f"adapter file {path} does not match its recorded sha256 (changed or truncated); "
                                 "refusing to load it")
