"""The adapter format: reading, checking and writing ``dsft_adapter.json`` without torch."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from dsft.adapter_format import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    Manifest,
    adapter_kind,
    digests,
    is_esft,
    read_manifest,
    verify_files,
)
from dsft.errors import IntegrityError


def manifest_dict(**changes) -> dict:
    data = {
        "schema_version": SCHEMA_VERSION, "domain": "finance", "version": "0.1.0", "kind": "lora+terms",
        "base": {"name": "tiny-deepseek-v2", "source": "preset:tiny-deepseek-v2",
                 "fingerprint": {"id": "ab" * 32, "architecture": "DeepseekV2ForCausalLM", "vocab_size": 4096}},
        "target_shapes": {"model.layers.0.self_attn.q_proj.weight": [64, 64]},
        "added_tokens": ["collateralized debt obligation"], "term_start": 4096, "base_vocab_size": 4096,
        "recipe": {"stages": []}, "metrics": {"eval_loss": 1.5}, "lora": {"r": 8, "alpha": 16},
        "files": {"adapter_model.safetensors": "0" * 64},
    }
    data.update(changes)
    return data


def test_a_manifest_round_trips_through_its_dataclass():
    m = Manifest.from_dict(manifest_dict())
    assert m.added_tokens == ("collateralized debt obligation",) and m.term_start == 4096
    assert m.trained_fingerprint["architecture"] == "DeepseekV2ForCausalLM" and not m.is_esft
    assert m.to_dict() == manifest_dict()
    assert Manifest.from_dict(m.to_dict()) == m


def test_a_missing_required_key_fails_naming_it():
    data = manifest_dict()
    del data["files"]
    with pytest.raises(IntegrityError, match="missing required key.*files"):
        Manifest.from_dict(data)


def test_a_wrong_type_names_the_field():
    with pytest.raises(IntegrityError, match="term_start: must be a non-negative integer"):
        Manifest.from_dict(manifest_dict(term_start="4096"))
    with pytest.raises(IntegrityError, match="base.fingerprint: must be an object"):
        Manifest.from_dict(manifest_dict(base={"name": "x", "fingerprint": [1]}))
    with pytest.raises(IntegrityError, match="domain: must be a domain name"):
        Manifest.from_dict(manifest_dict(domain="../etc"))
    with pytest.raises(IntegrityError, match="term_start: required when added_tokens is not empty"):
        Manifest.from_dict(manifest_dict(term_start=None))


def test_unknown_keys_fail_in_this_schema_and_warn_from_a_newer_one():
    with pytest.raises(IntegrityError, match=f"speed: unknown key for schema {SCHEMA_VERSION}"):
        Manifest.from_dict(manifest_dict(speed=3))
    newer = manifest_dict(schema_version=SCHEMA_VERSION + 1, speed=3)
    with pytest.warns(UserWarning, match=r"newer dsft.*\['speed'\]"):
        m = Manifest.from_dict(newer)
    assert m.to_dict()["speed"] == 3  # kept, so that re-writing the manifest loses nothing


BLOCKS = {"block_bytes": 4, "files": {"adapter_model.safetensors": ["1" * 64, "2" * 64]}}


def test_block_digests_are_a_schema_2_key_and_older_manifests_read_without_them():
    m = Manifest.from_dict(manifest_dict(schema_version=2, file_blocks=BLOCKS))
    assert m.blocks("adapter_model.safetensors") == (4, ("1" * 64, "2" * 64)) and m.blocks("terms.safetensors") is None
    assert Manifest.from_dict(m.to_dict()) == m
    v1 = Manifest.from_dict(manifest_dict(schema_version=1))
    assert v1.file_blocks is None and v1.blocks("adapter_model.safetensors") is None
    with pytest.raises(IntegrityError, match="file_blocks: unknown key for schema 1"):
        Manifest.from_dict(manifest_dict(schema_version=1, file_blocks=BLOCKS))


@pytest.mark.parametrize("bad", [
    {"block_bytes": 0, "files": {}},
    {"block_bytes": 4, "files": {"adapter_model.safetensors": []}},
    {"block_bytes": 4, "files": {"adapter_model.safetensors": "1" * 64}},
    {"files": {}},
])
def test_malformed_block_digests_name_the_field(bad):
    with pytest.raises(IntegrityError, match="file_blocks: must be an object"):
        Manifest.from_dict(manifest_dict(file_blocks=bad))


def test_block_digests_of_an_unlisted_file_are_refused():
    with pytest.raises(IntegrityError, match="file_blocks.files.other.bin: lists a file that files does not"):
        Manifest.from_dict(manifest_dict(file_blocks={"block_bytes": 4, "files": {"other.bin": ["1" * 64]}}))


def test_digests_records_blocks_for_files_larger_than_one(tmp_path):
    import hashlib

    (tmp_path / "big").write_bytes(b"0123456789")
    (tmp_path / "small").write_bytes(b"abc")
    got = digests(tmp_path, ["small", "big"], block_bytes=4)
    assert got["files"] == {"big": hashlib.sha256(b"0123456789").hexdigest(), "small": hashlib.sha256(b"abc").hexdigest()}
    assert got["file_blocks"] == {"block_bytes": 4, "files": {
        "big": [hashlib.sha256(piece).hexdigest() for piece in (b"0123", b"4567", b"89")]}}
    assert "file_blocks" not in digests(tmp_path, ["small"], block_bytes=4)


def test_an_imported_adapter_may_not_know_its_base():
    m = Manifest.from_dict(manifest_dict(base=None, base_vocab_size=None, added_tokens=[]))
    assert m.base is None and m.trained_fingerprint is None and m.to_dict()["base"] is None


def test_kinds():
    assert adapter_kind("esft", terms=True) == "esft+terms" and adapter_kind("lora", terms=False) == "lora"
    assert is_esft("esft") and is_esft("esft+terms") and not is_esft("lora+terms") and not is_esft(None)


def test_read_and_verify_a_directory(tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    with pytest.raises(IntegrityError, match="not a dsft adapter"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest_dict()))
    m = read_manifest(tmp_path)
    with pytest.raises(IntegrityError, match="does not match its recorded sha256"):
        verify_files(tmp_path, m)
    (tmp_path / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(IntegrityError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_the_format_and_the_registry_import_without_torch():
    code = "import sys, dsft.adapter_format, dsft.registry; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
