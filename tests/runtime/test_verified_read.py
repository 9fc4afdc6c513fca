"""Reading a file once and checking it against the manifest: whole-file sha256, or block digests in parallel."""
from __future__ import annotations

from pathlib import Path

import pytest

from dsft.adapter_format import SCHEMA_VERSION, Manifest, digests
from dsft.errors import IntegrityError
from dsft.runtime.verified_read import read_hashing, read_verified

NAME = "adapter_model.safetensors"
DATA = bytes(range(256)) * 3  # 768 bytes: 12 blocks of 64


def manifest_for(directory: Path, *, block_bytes: int | None) -> Manifest:
    hashed = digests(directory, [NAME], block_bytes=block_bytes or 1 << 30)  # one huge block: no file_blocks
    return Manifest.from_dict({"schema_version": SCHEMA_VERSION, "domain": "finance", "version": "0.1.0",
                               "kind": "lora", "base": None, "target_shapes": {}, "added_tokens": [], **hashed})


@pytest.fixture
def adapter_dir(tmp_path: Path) -> Path:
    (tmp_path / NAME).write_bytes(DATA)
    return tmp_path


@pytest.mark.parametrize("block_bytes", [64, 100, None])
def test_an_unchanged_file_reads_back_whole(adapter_dir, block_bytes):
    m = manifest_for(adapter_dir, block_bytes=block_bytes)
    assert (m.blocks(NAME) is None) == (block_bytes is None)
    data, verified = read_hashing(adapter_dir, m, NAME)
    verified()
    assert data.numpy().tobytes() == DATA and read_verified(adapter_dir, m, NAME) == DATA


@pytest.mark.parametrize("block_bytes", [64, None])
@pytest.mark.parametrize("damage", ["byte in the second block", "truncated", "extended", "last block shorter"])
def test_a_changed_file_is_refused_naming_it(adapter_dir, block_bytes, damage):
    m = manifest_for(adapter_dir, block_bytes=block_bytes)
    data = bytearray(DATA)
    if damage == "byte in the second block":
        data[64 + 5] ^= 0x01
    elif damage == "truncated":
        data = data[:640]  # a whole number of blocks fewer
    elif damage == "extended":
        data += b"\0" * 64
    else:
        data = data[:-1]
    (adapter_dir / NAME).write_bytes(bytes(data))
    got, verified = read_hashing(adapter_dir, m, NAME)
    assert got.numpy().tobytes() == bytes(data)  # the caller may parse meanwhile; nothing may leave before verified()
    with pytest.raises(IntegrityError, match=f"{NAME} does not match its recorded sha256"):
        verified()


def test_a_missing_or_unlisted_file_is_refused(adapter_dir):
    m = manifest_for(adapter_dir, block_bytes=64)
    with pytest.raises(IntegrityError, match="terms.safetensors is not listed"):
        read_hashing(adapter_dir, m, "terms.safetensors")
    (adapter_dir / NAME).unlink()
    with pytest.raises(IntegrityError, match=f"{NAME} is missing"):
        read_hashing(adapter_dir, m, NAME)
