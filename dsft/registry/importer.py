"""Manifests for adapters trained elsewhere (a plain PEFT directory), computed without torch.

Module shapes come from the safetensors header (8-byte length + JSON), so compatibility can be
judged for an imported LoRA exactly as for one trained here. The base it was trained on is unknown
unless the user names one (``--base``); the rules then judge it on module shapes alone.
"""
from __future__ import annotations

import json
import os
import re
import stat
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dsft.adapter_format import (
    MANIFEST_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    SCHEMA_VERSION,
    Manifest,
    digests,
)
from dsft.atomic import sha256_file
from dsft.errors import IntegrityError, UsageError
from dsft.registry import peft_export

_MAX_HEADER = 100 << 20
_LORA = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>A|B|embedding_A|embedding_B)(?:\.weight)?$")


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape, read from a safetensors file's header only.

    Raises:
        IntegrityError: the file is not a readable safetensors file.
    """
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER or n > path.stat().st_size - 8:
                raise ValueError(f"header length {n} is impossible")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as err:
        raise IntegrityError(f"{path} is not a readable safetensors file ({err}); check the copy") from None
    return {k: [int(d) for d in v["shape"]] for k, v in header.items() if k != "__metadata__"}


def lora_target_shapes(tensors: Mapping[str, list[int]]) -> dict[str, list[int]]:
    """The base parameters a LoRA adapts, with the shapes they must have.

    ``lora_A`` is ``[r, in]`` and ``lora_B`` is ``[out, r]`` for a Linear whose weight is ``[out, in]``;
    for an Embedding, ``lora_embedding_A`` is ``[r, num]`` and ``lora_embedding_B`` is ``[dim, r]``
    (weight ``[num, dim]``). Tensors of other layouts are not described.
    """
    parts: dict[str, dict[str, list[int]]] = {}
    for name, shape in tensors.items():
        m = _LORA.match(name)
        if m and len(shape) == 2:
            parts.setdefault(m.group("module"), {})[m.group("ab")] = shape
    out: dict[str, list[int]] = {}
    for module, p in sorted(parts.items()):
        if "A" in p and "B" in p:
            out[f"{module}.weight"] = [p["B"][0], p["A"][1]]
        elif "embedding_A" in p and "embedding_B" in p:
            out[f"{module}.weight"] = [p["embedding_A"][1], p["embedding_B"][0]]
    return out


def hash_files(root: Path) -> dict[str, Any]:
    """The manifest's ``files`` (relative posix path -> sha256) of every file under ``root`` except the
    manifest, and its ``file_blocks`` when a file is larger than one block (see :func:`digests`)."""
    return digests(root, [p.relative_to(root).as_posix() for p in root.rglob("*")
                          if p.is_file() and p.name != MANIFEST_FILE])


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
"""Weights in Python's pickle format (loading one can run code); dsft stores safetensors only."""
_MAX_FILES = 10_000


_SPARE_BYTES = 2**30


def check_tree(src: Path) -> int:
    """Refuse a directory to import that holds anything but plain files and folders, or pickled weights;
    return the bytes its files hold once copied (their apparent sizes: a sparse file is written out whole).

    A symlink would copy what it points at (a private file, a whole directory, ``/dev/zero``) into the
    registry, so links and devices, FIFOs and sockets are refused, never followed.

    Raises:
        UsageError: a link, a non-regular file, a pickle-format weights file, or more than 10,000 entries.
    """
    count, total = 0, 0
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        for name in dirnames + filenames:
            count += 1
            if count > _MAX_FILES:
                raise UsageError(f"{src} holds more than {_MAX_FILES:,} files; an adapter directory holds a few")
            p = Path(dirpath) / name
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                raise UsageError(f"{p} is a symbolic link; dsft imports plain files only: copy the file it points "
                                 "to into the directory (cp -L) and import again")
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                raise UsageError(f"{p} is not a regular file (a device, FIFO or socket); remove it and import again")
            if stat.S_ISREG(st.st_mode) and p.suffix.lower() in PICKLE_SUFFIXES:
                raise UsageError(f"{p} holds weights in pickle format, which dsft does not load (safetensors only): "
                                 "save the adapter with safe_serialization=True and import again")
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def check_room(needed: int, store: Path) -> None:
    """Refuse an import whose copy would not fit on the store's disk with 1 GiB to spare.

    Raises:
        UsageError: not enough free space (both figures named).
    """
    import shutil

    store.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(store).free
    if needed + _SPARE_BYTES > free:
        raise UsageError(f"the files to import take {needed / 2**30:,.2f} GiB once copied and {store} has {free / 2**30:,.2f} "
                         "GiB free (1 GiB kept spare); free space or leave large unrelated files out of the directory")


def manifest_file_path(src: Path, rel: Any) -> Path:
    """The file a manifest's ``files`` entry names, which must lie inside ``src``.

    Raises:
        IntegrityError: an absolute path, a ``..`` part, or anything else that leaves the directory.
    """
    parts = Path(str(rel)).parts
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in parts:
        raise IntegrityError(f"{src / MANIFEST_FILE} lists {str(rel)[:120]!r}, a path outside the adapter directory; "
                             "the manifest is damaged or forged")
    return src / rel


def read_source(src: Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The PEFT config and the dsft manifest (if any) of a directory to import.

    Raises:
        UsageError: not a directory, neither ``adapter_config.json`` nor ``dsft_adapter.json`` in it, or a link,
            device or pickle file in it (see :func:`check_tree`).
        IntegrityError: a dsft manifest that is malformed (the field is named) or whose files do not match.
    """
    if not src.is_dir():
        raise UsageError(f"{src} is not a directory; give the adapter's directory (with adapter_config.json)")
    check_tree(src)
    peft: dict[str, Any] = {}
    manifest: dict[str, Any] | None = None
    try:
        if (src / PEFT_CONFIG_FILE).is_file():
            peft = json.loads((src / PEFT_CONFIG_FILE).read_text())
        if (src / MANIFEST_FILE).is_file():
            manifest = json.loads((src / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"cannot read the adapter config in {src}: {err}") from None
    if not peft and manifest is None:
        raise UsageError(f"{src} is not a PEFT adapter directory (no {PEFT_CONFIG_FILE}); give the directory "
                         "that save_pretrained wrote")
    if manifest is not None:
        listed = manifest.get("files") if isinstance(manifest, Mapping) else None
        for rel in listed if isinstance(listed, Mapping) else ():
            manifest_file_path(src, rel)  # a path leaving the directory is refused before anything else is read
        for rel, want in Manifest.from_dict(manifest, where=str(src / MANIFEST_FILE)).files.items():
            p = manifest_file_path(src, rel)
            if not p.is_file() or sha256_file(p) != want:
                raise IntegrityError(f"{p} does not match {src / MANIFEST_FILE} (missing, changed or truncated); "
                                     "copy the adapter again")
    return peft, manifest


def default_kind(peft: Mapping[str, Any], manifest: Mapping[str, Any] | None,
                 exported: Mapping[str, Any] | None = None) -> str:
    if manifest and manifest.get("kind"):
        return str(manifest["kind"])
    if exported and exported.get("kind"):
        return str(exported["kind"])
    kind = str(peft.get("peft_type") or "lora").lower()
    return re.sub(r"[^a-z0-9+_-]", "-", kind)[:32] or "lora"


def build_manifest(staged: Path, *, domain: str, version: str, kind: str, peft: Mapping[str, Any],
                   previous: Mapping[str, Any] | None, source: str,
                   base: tuple[str, str, Mapping[str, Any]] | None,
                   exported: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest of an imported adapter whose files are already staged in ``staged``.

    Args:
        staged: the copied directory (its files are hashed).
        domain, version, kind: what it is registered as.
        peft: its ``adapter_config.json``.
        previous: its own ``dsft_adapter.json`` when it came from another dsft (kept, re-stamped).
        source: where it was imported from, recorded as is.
        base: ``(name, source, fingerprint)`` of the base the user says it was trained on, if any.
        exported: the ``dsft_export.json`` record when it is dsft's own PEFT export (see :mod:`.peft_export`).
    """
    hashed = hash_files(staged)
    if previous:
        m = dict(previous)
    else:
        weights = staged / PEFT_WEIGHTS_FILE
        shapes = lora_target_shapes(safetensors_shapes(weights)) if weights.is_file() else {}
        m = {"schema_version": SCHEMA_VERSION, "base": None, "target_shapes": shapes,
             "added_tokens": [], "base_vocab_size": None, "recipe": None, "metrics": {}}
        if peft.get("base_model_name_or_path"):
            m["base"] = {"name": peft["base_model_name_or_path"], "source": None, "fingerprint": None}
        if exported:
            m.update(peft_export.manifest_fields(dict(exported), shapes))
    if base is not None:
        name, bsource, fp = base
        m["base"] = {"name": name, "source": bsource,
                     "fingerprint": {k: v for k, v in fp.items() if k != "param_shapes"}}
    m.pop("file_blocks", None)  # the previous dsft's block digests are never trusted: recomputed with files
    if "file_blocks" in hashed:  # a key of schema 2: an older manifest that gains it becomes one
        m["schema_version"] = max(int(m["schema_version"]), SCHEMA_VERSION)
    m.update(domain=domain, version=version, kind=kind, imported_from=source, **hashed)
    return m
