"""Builders shared by the registry tests: hand-made fingerprints, manifests and adapter directories.

No torch and no dsft.base: the registry decides from dicts, so the tests hand it dicts. Kept in a
uniquely named module (not conftest) so spawned worker processes can import it too.
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from dsft.atomic import sha256_file, staging_dir, write_json_atomic
from dsft.registry import AdapterRecord, Registry

ARCH = "DeepseekV2ForCausalLM"
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
EXPERTS = "model.layers.1.mlp.experts.gate_up_proj"
EMBED = "model.embed_tokens.weight"


def fingerprint(*, arch: str = ARCH, weights: str = "w1", tokenizer: str = "t1", config: str = "c1",
                vocab: int = 4096, hidden: int = 64, experts: int = 8) -> dict[str, Any]:
    """A fingerprint as dsft.base would compute it; ``id`` is a hash of the hashes."""
    # the config hash covers the sizes, as a real one would
    hashes = {"config_hash": hashlib.sha256(f"{config}/{hidden}/{experts}/{vocab}".encode()).hexdigest(),
              "tokenizer_hash": hashlib.sha256(tokenizer.encode()).hexdigest(),
              "weights_hash": hashlib.sha256(weights.encode()).hexdigest()}
    fp_id = hashlib.sha256((arch + "".join(hashes.values())).encode()).hexdigest()
    return {"id": fp_id, "architecture": arch, "model_type": "deepseek_v2", **hashes, "vocab_size": vocab,
            "param_shapes": {Q_PROJ: [hidden, hidden], EXPERTS: [experts, 4 * hidden, hidden],
                             EMBED: [vocab, hidden]}}


def manifest(domain: str, version: str | None, fp: dict[str, Any], *, kind: str = "lora+terms",
             targets: dict[str, list[int]] | None = None, added_tokens: list[str] | None = None,
             files: dict[str, str] | None = None, vocab: int | None = None) -> dict[str, Any]:
    """A ``dsft_adapter.json`` for an adapter trained on ``fp``."""
    hidden = fp["param_shapes"][Q_PROJ][0]
    return {
        "schema_version": 1, "domain": domain, "version": version, "kind": kind,
        "base": {"name": "tiny", "source": "preset:tiny",
                 "fingerprint": {k: v for k, v in fp.items() if k != "param_shapes"}},
        "target_shapes": targets if targets is not None else {Q_PROJ: [hidden, hidden]},
        "added_tokens": ["collateralized debt obligation"] if added_tokens is None else added_tokens,
        "base_vocab_size": fp["vocab_size"] if vocab is None else vocab,
        "term_start": fp["vocab_size"] if vocab is None else vocab,
        "recipe": {"lr": 1e-4}, "metrics": {"loss": 1.5}, "files": files or {},
    }


def write_adapter_files(d: Path, seed: str = "x") -> dict[str, str]:
    """Write small stand-ins for the adapter files; returns their sha256 by relative path."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_model.safetensors").write_bytes(safetensors_bytes({
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [8, 64],
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": [64, 8]}) + seed.encode())
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "seed": seed}))
    (d / "terms.safetensors").write_bytes(safetensors_bytes({"rows": [1, 64]}))
    return {p.name: sha256_file(p) for p in sorted(d.iterdir())}


def safetensors_bytes(shapes: dict[str, list[int]]) -> bytes:
    """A valid safetensors file of float32 zeros with these tensor shapes."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        n = 4
        for dim in shape:
            n *= dim
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * offset


def register(reg: Registry, domain: str, fp: dict[str, Any], *, parent: str | None = None,
             metrics: dict[str, Any] | None = None, seed: str = "x", **manifest_kw: Any) -> AdapterRecord:
    """Register one trained adapter the way dsft train does: stage files, then one transaction."""
    with staging_dir(reg.adapters_root / domain / "new") as staged:
        files = write_adapter_files(staged, seed)
        with reg.transaction() as tx:
            base = tx.ensure_base(name="tiny", source="preset:tiny", architecture=fp["architecture"], fingerprint=fp)
            version = tx.next_adapter_version(domain=domain, base_fingerprint=fp)
            man = manifest(domain, version, fp, files=files, **manifest_kw)
            write_json_atomic(staged / "dsft_adapter.json", man)
            final = tx.place_dir(staged, domain=domain, version=version)
            return tx.add_adapter(
                domain=domain, version=version, kind=man["kind"], path=str(final), manifest=man,
                manifest_sha256=sha256_file(final / "dsft_adapter.json"), recipe=man["recipe"],
                metrics=metrics if metrics is not None else {"loss": 1.5}, base=base, parent=parent)
