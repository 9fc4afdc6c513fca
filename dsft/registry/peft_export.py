"""Re-importing dsft's own PEFT export (``dsft export --format peft``): back to the layout dsft serves.

The export stores an adapter's term rows as PEFT *trainable tokens* (``trainable_token_indices`` in
``adapter_config.json``, ``...token_adapter.trainable_tokens_delta`` tensors) so that plain PEFT loads it,
and records where it came from in ``dsft_export.json``. On import these rows go back to
``terms.safetensors`` (``embed`` and ``head``, as training writes them) and the manifest takes the
export's record (base fingerprint, added tokens, module shapes), so ``registry check`` judges it like the
original and ``generate`` serves it. Torch-free: safetensors files are split by their byte offsets.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from dsft.atomic import write_bytes_atomic, write_json_atomic
from dsft.errors import IntegrityError

EXPORT_RECORD = "dsft_export.json"
TERMS_FILE = "terms.safetensors"
"""As :data:`dsft.adapters.terms.TERMS_FILE` (the registry does not import dsft.adapters)."""
_DELTA = ".token_adapter.trainable_tokens_delta"
_MAX_HEADER = 100 << 20


def export_record(directory: Path) -> dict[str, Any] | None:
    """The ``dsft_export.json`` of a PEFT-format dsft export in ``directory``, or None."""
    path = Path(directory) / EXPORT_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == "peft" else None


def read_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    """(header, data) of a safetensors file; the header maps names to dtype, shape and data offsets."""
    raw = path.read_bytes()
    try:
        (n,) = struct.unpack("<Q", raw[:8])
        if n > _MAX_HEADER or n > len(raw) - 8:
            raise ValueError(f"header length {n} is impossible")
        header = json.loads(raw[8:8 + n])
    except (ValueError, struct.error) as err:
        raise IntegrityError(f"{path} is not a readable safetensors file ({err}); check the copy") from None
    return header, raw[8 + n:]


def safetensors_bytes(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file of ``name -> (dtype, shape, raw bytes)``."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset, chunks = 0, []
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def restore_terms(staged: Path, record: dict[str, Any]) -> None:
    """Move the trainable-token rows of a staged PEFT export back to ``terms.safetensors`` (in place).

    Raises:
        IntegrityError: the rows named by ``trainable_token_indices`` are missing or do not match the record.
    """
    config_path, weights = staged / "adapter_config.json", staged / "adapter_model.safetensors"
    config = json.loads(config_path.read_text())
    indices = config.get("trainable_token_indices")
    if not indices or not weights.is_file():
        return
    header, data = read_safetensors(weights)
    kept: dict[str, tuple[str, list[int], bytes]] = {}
    rows: dict[str, tuple[str, list[int], bytes]] = {}
    embed_name, head_name = list(indices)[0], list(indices)[-1]  # the export lists the input embedding first
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        entry = (meta["dtype"], meta["shape"], data[begin:end])
        if name.endswith(_DELTA):
            module = name[: -len(_DELTA)].rsplit(".", 1)[-1]
            rows["embed" if module == embed_name else "head" if module == head_name else module] = entry
        else:
            kept[name] = entry
    added = record.get("added_tokens") or []
    if set(rows) != {"embed", "head"} or rows["embed"][1][0] != len(added):
        raise IntegrityError(f"{staged}: the trainable-token rows ({', '.join(sorted(rows)) or 'none'}) do not match the "
                             f"{len(added)} added tokens of {EXPORT_RECORD}; export the adapter again")
    write_bytes_atomic(staged / TERMS_FILE, safetensors_bytes(rows, {"start": str(record.get("term_start")),
                                                                     "count": str(len(added))}))
    write_bytes_atomic(weights, safetensors_bytes(kept, header.get("__metadata__")))
    config["trainable_token_indices"] = None
    write_json_atomic(config_path, config)


def manifest_fields(record: dict[str, Any], shapes: dict[str, Any]) -> dict[str, Any]:
    """The manifest fields an export's record gives back (module shapes computed when it has none)."""
    base_fp = record.get("base_fingerprint") or None
    added = list(record.get("added_tokens") or [])
    return {"base": {"name": record.get("base_name"), "source": record.get("base_source"), "fingerprint": base_fp},
            "target_shapes": record.get("target_shapes") or shapes, "added_tokens": added,
            "term_start": record.get("term_start"),
            "base_vocab_size": record.get("base_vocab_size") or (base_fp or {}).get("vocab_size"),
            "metrics": record.get("metrics") or {}}
