"""A safetensors file's tensors as views of its bytes: what safetensors itself reads, and nothing malformed."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load, save

from dsft.errors import IntegrityError
from dsft.runtime.tensor_file import tensor_views

TENSORS = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, 3).bfloat16(), "empty": torch.ones(0, 3),
           "mask": torch.tensor([True, False, True])}


def _tensor(blob: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8)


def _file(header: dict, data: bytes = b"") -> torch.Tensor:
    raw = json.dumps(header).encode()
    return _tensor(len(raw).to_bytes(8, "little") + raw + data)


def test_views_equal_what_safetensors_reads_without_copying():
    blob = _tensor(save(TENSORS, metadata={"format": "pt"}))
    views = tensor_views(blob, "x.safetensors")
    want = load(blob.numpy().tobytes())
    assert views.keys() == want.keys()
    for name, t in want.items():
        assert views[name].dtype == t.dtype and torch.equal(views[name], t)
    views["a"][0, 0] = 42.0  # a view of the buffer, not a copy
    assert load(blob.numpy().tobytes())["a"][0, 0] == 42.0


def test_a_misaligned_tensor_is_copied():
    blob = _file({"odd": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
                  "f": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]}},
                 b"\x07" + torch.tensor([1.5, -2.0]).numpy().tobytes())
    views = tensor_views(blob, "x")
    assert views["odd"].tolist() == [7] and views["f"].tolist() == [1.5, -2.0]


@pytest.mark.parametrize("blob,what", [
    (_tensor(b"\x01\x02"), "shorter than its header"),
    (_tensor((1000).to_bytes(8, "little") + b"{}"), "header longer than the file"),
    (_tensor((3).to_bytes(8, "little") + b"{x}"), "header"),
    (_file({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8), "data_offsets"),
    (_file({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8), "data_offsets"),
    (_file({"t": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0"), "unknown"),
])
def test_malformed_files_are_refused_naming_the_file(blob, what):
    with pytest.raises(IntegrityError, match=f"bad.safetensors: not a valid safetensors file.*{what}"):
        tensor_views(blob, "bad.safetensors")
