"""A base model's identity: architecture + config hash, tokenizer hash, weights hash.

Computed from the files of a model directory, once, and cached beside the model (or under
``$DSFT_HOME/fingerprints/`` when that directory is read-only). The registry decides
compatibility from this dict alone; it never loads weights.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from dsft.atomic import sha256_bytes, sha256_file, sha256_json, write_json_atomic
from dsft.base.remote_code import hf_kwargs, refuse_remote_code
from dsft.home import dsft_home

FINGERPRINT_FILE = "dsft_fingerprint.json"
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "dtype", "torch_dtype", "use_cache", "_experts_implementation"}


def weight_files(model_dir: Path) -> list[Path]:
    return sorted(model_dir.glob("*.safetensors"))


def _stamp(model_dir: Path) -> list:
    """Sizes and mtimes of the files the fingerprint reads: a changed file invalidates the cache."""
    files = [model_dir / "config.json", *weight_files(model_dir), *sorted(model_dir.glob("tokenizer*"))]
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]


def tokenizer_hash(tokenizer) -> str:
    """Hash of what the tokenizer maps text to: its vocabulary and special tokens."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return sha256_json({"vocab": vocab, "special": sorted(tokenizer.all_special_tokens)})


def compute_fingerprint(model_dir: str | Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """Fingerprint of a Hugging Face model directory (config.json, *.safetensors, tokenizer files).

    Raises:
        UsageError: the directory asks to run its own code and ``trust_remote_code`` is false.
    """
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    refuse_remote_code(model_dir, trust_remote_code)
    config = json.loads((model_dir / "config.json").read_text())
    config_core = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    file_hashes = [sha256_file(f) for f in weight_files(model_dir)]
    tok = AutoTokenizer.from_pretrained(model_dir, **hf_kwargs(trust_remote_code))
    fp = {
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "model_type": config.get("model_type"),
        "config_hash": sha256_json(config_core),
        "tokenizer_hash": tokenizer_hash(tok),
        "weights_hash": sha256_bytes("".join(file_hashes).encode()),
        "vocab_size": config.get("vocab_size"),
        "tokenizer_size": len(tok),
        "param_shapes": param_shapes(model_dir, trust_remote_code),
    }
    fp["id"] = fingerprint_id(fp)
    return fp


def param_shapes(model_dir: Path, trust_remote_code: bool = False) -> dict[str, list[int]]:
    """Parameter names and shapes as the loaded model has them.

    Read from a model built on the meta device (no memory, no weights): checkpoints may store
    routed experts per expert (the transformers v4 layout) while the loaded model fuses them into
    3-D parameters, and adapters name the latter.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, **hf_kwargs(trust_remote_code))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **hf_kwargs(trust_remote_code))
    return {name: list(p.shape) for name, p in model.named_parameters()}


def fingerprint_id(fp: dict[str, Any]) -> str:
    return sha256_json([fp["architecture"], fp["config_hash"], fp["tokenizer_hash"], fp["weights_hash"]])


def _cache_path(model_dir: Path) -> Path:
    if os.access(model_dir, os.W_OK):
        return model_dir / FINGERPRINT_FILE
    return dsft_home() / "fingerprints" / f"{sha256_bytes(str(model_dir.resolve()).encode())}.json"


def save_fingerprint(model_dir: Path, fp: dict[str, Any]) -> None:
    write_json_atomic(_cache_path(model_dir), {"stamp": _stamp(model_dir), "fingerprint": fp})


def load_fingerprint(model_dir: str | Path, trust_remote_code: bool = False) -> dict[str, Any]:
    """The cached fingerprint, recomputed when the directory's files changed since it was taken.

    Raises:
        UsageError: the directory asks to run its own code and ``trust_remote_code`` is false.
    """
    model_dir = Path(model_dir)
    cache = _cache_path(model_dir)
    if cache.exists():
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == _stamp(model_dir):
            return cached["fingerprint"]
    fp = compute_fingerprint(model_dir, trust_remote_code)
    save_fingerprint(model_dir, fp)
    return fp


def summary(fp: dict[str, Any]) -> dict[str, Any]:
    """The fingerprint without the per-parameter shapes (what a manifest records about its base)."""
    return {k: v for k, v in fp.items() if k != "param_shapes"}
