"""Resolve ``--base`` (preset name, local directory or hub id) and load it: one path for all three."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.base.arch import ArchSpec, spec_for
from dsft.base.fingerprint import load_fingerprint
from dsft.base.presets import PRESETS, build_preset
from dsft.base.remote_code import hf_kwargs, refuse_remote_code
from dsft.base.shard_load import RANDOM_INIT_KEY
from dsft.errors import NotFoundError, UnsupportedModelError, UsageError, show

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_hub_id(name: str) -> bool:
    """``org/name`` as the Hugging Face Hub spells a repository (not a relative or absolute path)."""
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


@dataclass(frozen=True)
class BaseRef:
    """Where a base comes from: ``name`` as the user gave it, ``source`` as the registry records it."""

    name: str
    source: str
    path: Path


@dataclass
class LoadedBase:
    ref: BaseRef
    model: Any
    tokenizer: Any
    spec: ArchSpec
    fingerprint: dict[str, Any] = field(repr=False)
    weights: Any = field(default=None, repr=False)
    """With ``meta=True``: the :class:`dsft.base.shard_load.WeightSource` that fills the meta model's parameters."""


def resolve_base(base: str, revision: str | None = None) -> BaseRef:
    """Find the model directory for ``base`` without loading weights.

    Raises:
        NotFoundError: unknown preset, missing directory, or a hub id that is not in the local cache.
    """
    if base in PRESETS:
        return BaseRef(base, f"preset:{base}", build_preset(base))
    path = Path(base).expanduser()
    try:
        is_dir = path.is_dir()
    except OSError:  # a name too long for the file system (ENAMETOOLONG): no such directory
        is_dir = False
    if is_dir:
        if not (path / "config.json").exists():
            raise NotFoundError(f"{base} is a directory but holds no config.json; point --base at a Hugging Face model directory")
        return BaseRef(base, f"path:{path.resolve()}", path.resolve())
    if looks_like_hub_id(base):
        from huggingface_hub import snapshot_download

        try:
            local = snapshot_download(base, revision=revision, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.py"])
        except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
            raise NotFoundError(
                f"base {show(base)} could not be fetched from the hub ({type(exc).__name__}); "
                "download it first (huggingface-cli download) or pass its local directory"
            ) from None
        return BaseRef(base, f"hub:{base}@{revision or 'main'}", Path(local))
    if any(sep in base for sep in ("/", "\\")) or base.startswith("."):
        raise NotFoundError(f"base directory {show(base, 200)} does not exist; check the path")
    raise NotFoundError(f"unknown base {show(base)}; use a preset ({', '.join(PRESETS)}), a local model directory or a hub id")


def read_config(ref: BaseRef, trust_remote_code: bool = False) -> dict[str, Any]:
    """The raw config.json, checked to be a supported MoE (and free of remote code unless allowed).

    Raises:
        UsageError: config.json is not JSON, or the directory asks to run its own code (``auto_map`` in
            config.json or tokenizer_config.json) and ``trust_remote_code`` is false.
        UnsupportedModelError: not an architecture in dsft's table.
    """
    refuse_remote_code(ref.path, trust_remote_code, ref.name)
    try:
        config = json.loads((ref.path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{ref.path / 'config.json'} is not valid JSON ({exc.msg}, line {exc.lineno}); fix or re-download it") from None
    spec_for(config.get("model_type"), config.get("architectures"))
    return config


def base_architecture(base: str, trust_remote_code: bool = False) -> str | None:
    """The architecture of ``base`` from its config alone: a preset's table entry or a directory's
    config.json; never builds a preset nor reads weights. None for a hub id (its config may not be local).

    Raises:
        UsageError: the directory asks to run its own code. UnsupportedModelError: not a supported MoE.
    """
    if base in PRESETS:
        return PRESETS[base].model_class
    path = Path(base).expanduser()
    try:
        if not (path / "config.json").is_file():
            return None
    except OSError:
        return None
    config = read_config(BaseRef(base, f"path:{path.resolve()}", path.resolve()), trust_remote_code)
    return spec_for(config.get("model_type"), config.get("architectures")).architecture


def fingerprint_for(base: str | BaseRef, trust_remote_code: bool = False) -> tuple[str, str, dict[str, Any]]:
    """(name, source, fingerprint) of a base (a name or an already resolved ref), without loading its weights."""
    ref = base if isinstance(base, BaseRef) else resolve_base(base)
    read_config(ref, trust_remote_code)
    return ref.name, ref.source, load_fingerprint(ref.path, trust_remote_code)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_base(base: str | BaseRef, *, device: str | None = None, dtype: torch.dtype | None = None, trust_remote_code: bool = False,
              meta: bool = False) -> LoadedBase:
    """Load model + tokenizer + fingerprint of ``base``.

    Args:
        base: preset name, local model directory or hub id, or a :class:`BaseRef` already resolved
            (a run resolves its base once, before any weights load).
        device: defaults to CUDA when available.
        dtype: defaults to bf16 on CUDA and fp32 on CPU.
        trust_remote_code: allow model code shipped in the model directory to run (off by default).
        meta: build the model on the meta device and read no weights: the caller shards it and fills each
            rank's part from ``LoadedBase.weights`` (:mod:`dsft.base.shard_load`).

    Raises:
        NotFoundError, UnsupportedModelError, UsageError.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # dsft shows its own progress; library bars would interleave with it
    hf_logging.set_verbosity_error()
    ref, base = (base, base.name) if isinstance(base, BaseRef) else (resolve_base(base), base)
    config = read_config(ref, trust_remote_code)
    spec = spec_for(config.get("model_type"), config.get("architectures"))
    device = device or default_device()
    # On a GPU machine a CPU load is a staging step (QLoRA quantises from there onto the GPU): allowed.
    if ref.source.startswith("preset:") and not PRESETS[ref.name].cpu_ok and device == "cpu" and not torch.cuda.is_available():
        raise UsageError(f"preset {ref.name} is for GPU benchmarks ({PRESETS[ref.name].description}); use tiny-deepseek-v2 on CPU")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    weights = None
    if meta or config.get(RANDOM_INIT_KEY):
        # Sharded loading, or a preset whose weights are generated (it has no weight files to load)
        from transformers import AutoConfig

        from dsft.base.shard_load import materialize, meta_model, weight_source

        if trust_remote_code and config.get("auto_map"):
            raise UsageError(f"{base}: sharded loading builds transformers' own classes only; use --backend ddp for remote code")
        model = meta_model(spec.architecture, AutoConfig.from_pretrained(ref.path, trust_remote_code=False), dtype)
        weights = weight_source(ref.path, config)
        if not meta:
            materialize(model, weights, device)
            model.eval()  # as from_pretrained leaves it
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                ref.path, dtype=dtype, device_map=device, use_safetensors=True, **hf_kwargs(trust_remote_code)
            )
        except ValueError as exc:
            if "trust_remote_code" in str(exc):
                raise UsageError(f"{base} needs its own model code; pass --trust-remote-code if you trust its authors") from None
            raise
    if spec.architecture != type(model).__name__:
        raise UnsupportedModelError(f"{base} loaded as {type(model).__name__}, expected {spec.architecture}; it is not a supported MoE model")
    tokenizer = AutoTokenizer.from_pretrained(ref.path, **hf_kwargs(trust_remote_code))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedBase(ref, model, tokenizer, spec, load_fingerprint(ref.path, trust_remote_code), weights if meta else None)
