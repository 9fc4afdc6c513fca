"""Tensors of a safetensors file held in memory, as views of its bytes (no copy).

``safetensors.torch.load(bytes)`` copies every tensor out of the buffer: 0.4 s for the 900 MB of a
lite-shape adapter, as long as reading it. The runtime already holds the file's bytes (read once, hashed
by :mod:`dsft.runtime.verified_read`), so it takes each tensor as a view of them instead. The format is
the documented one (``safetensors`` README): an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data. The
header is checked as safetensors checks it: offsets inside the data, sizes that match the shapes.
"""
from __future__ import annotations

import json
import math

import torch

from dsft.errors import IntegrityError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def tensor_views(raw: torch.Tensor, where: str) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` viewing ``raw`` (a safetensors file's bytes as a uint8 CPU tensor).

    Raises:
        IntegrityError: the header is malformed, names an unknown dtype or points outside the data.
    """
    def bad(what: str) -> IntegrityError:
        return IntegrityError(f"{where}: not a valid safetensors file ({what}); re-export or retrain the adapter")

    if len(raw) < 8:
        raise bad("shorter than its header")
    n = int.from_bytes(raw[:8].numpy().tobytes(), "little")
    if n > len(raw) - 8:
        raise bad("header longer than the file")
    try:
        header = json.loads(raw[8 : 8 + n].numpy().tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad(f"header: {exc}") from None
    if not isinstance(header, dict):
        raise bad("header is not an object")
    header.pop("__metadata__", None)
    start, size = 8 + n, len(raw) - 8 - n
    out = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = _DTYPES[info["dtype"]], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {name!r}: dtype, shape or data_offsets missing or unknown") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= size and end - begin == nbytes):
            raise bad(f"tensor {name!r}: data_offsets {[begin, end]} do not hold {shape} {info['dtype']}")
        piece = raw[start + begin : start + end]
        if (start + begin) % dtype.itemsize:  # not aligned for a view of that dtype: copy this one
            piece = piece.clone()
        out[name] = piece.view(dtype).view(shape)
    return out
