"""Loading a base straight into FSDP2 shards, so that a base larger than one GPU (or than one host's memory
divided by the ranks) can train.

Without it every rank builds the whole base and ``fully_shard`` then cuts its part out. Here:

1. :func:`meta_model` builds the model on the *meta* device (shapes, no storage); buffers are built for
   real, by the modules' own constructors (rotary ``inv_freq`` and the like are small, and computing them
   the module's way is the only way to get them right for every architecture);
2. the caller attaches dsft's adapters (term rows, PEFT LoRA) and applies ``fully_shard``: the adapters
   are small and are created on the CPU exactly as in a single process (:func:`adapters_off_meta`), so the
   same seed gives the same LoRA initialisation;
3. :func:`materialize` gives every meta parameter storage for this rank's shard only (FSDP2 shards dim 0)
   and fills it from a :class:`WeightSource`: the rows of a checkpoint's safetensors tensors that fall
   in the shard (``get_slice`` reads those bytes only), or reproducible random rows.

Peak host memory per rank is its shard plus one dim-0 row (one expert's matrices for fused expert
tensors) at a time: no full tensor is ever assembled.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from dsft.errors import UsageError

RANDOM_INIT_KEY = "dsft_random_init"
"""config.json key of a preset whose weights are generated, never stored (:class:`RandomWeights`)."""
RANDOM_INIT = "rows-v1"
# Per-expert checkpoint names of the fused expert tensors: (gate, up, down), as transformers 5's conversion
# mapping reads them (``qwen2_moe`` for the DeepSeek/Qwen/OLMoE/GLM families, ``mixtral`` for Mixtral).
EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
RENAMES = ((".mlp.", ".block_sparse_moe."),)
"""Module renames of the same conversion mapping (checkpoint name on the right)."""
PEFT_PARTS = (".base_layer", ".base")
"""Name segments that dsft's wrappers add in front of a base weight (PEFT's LoRA layers, term rows)."""


def meta_model(model_class: str, config: Any, dtype: torch.dtype) -> nn.Module:
    """``model_class`` built from ``config`` with its parameters on the meta device and its buffers real."""
    import transformers
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return getattr(transformers, model_class)._from_config(config, dtype=dtype)


def base_key(name: str) -> str:
    """The base model's name of a parameter of the wrapped model (PEFT's prefix and wrapper segments removed)."""
    name = name.removeprefix("base_model.model.")
    for part in PEFT_PARTS:
        while part + "." in name:  # nested wrappers (one PEFT ParamWrapper per fused expert tensor)
            name = name.replace(part + ".", ".")
    return name


@contextmanager
def adapters_off_meta() -> Iterator[None]:
    """While active, PEFT leaves the adapters it creates on the CPU when the layer they wrap is on the meta device
    (it would move them there, dropping their initial values); they still take the base's dtype. They are
    created, and draw from the global RNG, exactly as in a single process."""
    from peft.tuners.lora.layer import ParamWrapper
    from peft.tuners.lora.model import LoraModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    plain, wrapper = BaseTunerLayer._move_adapter_to_device_of_base_layer, ParamWrapper._move_adapter_to_device_of_base_layer
    replace = LoraModel._replace_module
    cpu = torch.device("cpu")

    def move_plain(self, adapter_name: str, device: torch.device | None = None) -> None:
        weight = getattr(self.get_base_layer(), "weight", None)
        plain(self, adapter_name, cpu if device is None and weight is not None and weight.is_meta else device)

    def move_wrapper(self, adapter_name: str, device: torch.device | None = None) -> None:
        param = self.get_param()
        if not param.is_meta:
            return wrapper(self, adapter_name, device)
        for layer_name in self.adapter_layer_names + self.other_param_names:  # PEFT's cast, without the move
            layer = getattr(self, layer_name, None)
            if isinstance(layer, (nn.ModuleDict, nn.ParameterDict)) and adapter_name in layer and param.dtype.is_floating_point:
                layer[adapter_name] = layer[adapter_name].to(dtype=param.dtype)

    def replace_module(self, parent, child_name: str, new_module, child) -> None:
        base = child.base_layer if hasattr(child, "base_layer") else child
        if any(p.is_meta for p in base.parameters()):
            setattr(parent, child_name, new_module)  # PEFT's dispatch would move the new adapter to the meta device
            return
        replace(self, parent, child_name, new_module, child)

    BaseTunerLayer._move_adapter_to_device_of_base_layer = move_plain  # type: ignore[method-assign]
    ParamWrapper._move_adapter_to_device_of_base_layer = move_wrapper  # type: ignore[method-assign]
    LoraModel._replace_module = replace_module  # type: ignore[method-assign]
    try:
        yield
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer = plain  # type: ignore[method-assign]
        ParamWrapper._move_adapter_to_device_of_base_layer = wrapper  # type: ignore[method-assign]
        LoraModel._replace_module = replace  # type: ignore[method-assign]


class WeightSource(Protocol):
    """Where a meta model's weights come from, a dim-0 range at a time."""

    def rows(self, key: str, shape: Sequence[int], lo: int, hi: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Rows ``lo:hi`` (dim 0) of parameter ``key`` of full shape ``shape``."""
        ...

    def buffer(self, key: str) -> torch.Tensor | None:
        """A persistent buffer's stored value (None: keep the one the module built)."""
        ...


class CheckpointWeights:
    """The safetensors files of a model directory, read by ranges of rows.

    Tensors stored under the model's own names are sliced directly; routed experts stored per expert (the
    layout transformers 5 itself writes with ``save_pretrained``, and that of the published checkpoints) are
    read one expert at a time and fused as transformers' conversion mapping fuses them.
    """

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        from dsft.base.fingerprint import weight_files

        self.files = [safe_open(str(f), framework="pt") for f in weight_files(model_dir)]
        if not self.files:
            raise UsageError(f"{model_dir} holds no *.safetensors files: sharded loading reads safetensors only; "
                             "re-save the model with save_pretrained(safe_serialization=True)")
        self.where = {k: f for f in self.files for k in f.keys()}
        self.max_read = 0
        """Bytes of the largest single read: a row range of one tensor (what the structural test checks)."""

    def _read(self, key: str, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
        part = self.where[key].get_slice(key)
        t = part[lo:hi] if lo is not None else part[:]
        self.max_read = max(self.max_read, t.numel() * t.element_size())
        return t

    def _stored(self, key: str) -> str | None:
        for a, b in ((None, None), *RENAMES):
            k = key if a is None else key.replace(a, b)
            if k in self.where:
                return k
        return None

    def rows(self, key: str, shape: Sequence[int], lo: int, hi: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        stored = self._stored(key)
        if stored is not None:
            t = self._read(stored, lo, hi)
        elif key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            t = self._experts(key, lo, hi)
        else:
            raise UsageError(f"{key} is not in the checkpoint under that name nor as per-expert tensors: sharded loading "
                             "reads transformers 5 checkpoints; load it once and save_pretrained it, or use --backend ddp")
        if tuple(t.shape[1:]) != tuple(shape[1:]):
            raise UsageError(f"{key}: the checkpoint's shape {tuple(t.shape)} does not fit the model's {tuple(shape)}")
        return t.to(device=device, dtype=dtype)

    def _experts(self, key: str, lo: int, hi: int) -> torch.Tensor:
        prefix, fused = key.rsplit(".", 1)
        for names in EXPERT_NAMES:
            wanted = (names[0], names[1]) if fused == "gate_up_proj" else (names[2],)
            per = [[self._stored(f"{prefix}.{e}.{n}.weight") for n in wanted] for e in range(lo, hi)]
            if all(k is not None for ks in per for k in ks):
                # One expert at a time: gate and up concatenated on dim 0 (the fused [2I, H] layout)
                return torch.stack([torch.cat([self._read(k) for k in ks if k is not None]) for ks in per]) if per \
                    else torch.empty(0)
        raise UsageError(f"{key}: the checkpoint stores its experts in a layout sharded loading does not read; "
                         "load it once and save_pretrained it with transformers 5, or use --backend ddp")

    def buffer(self, key: str) -> torch.Tensor | None:
        stored = self._stored(key)
        return self._read(stored) if stored is not None else None


class RandomWeights:
    """Reproducible random weights: row ``r`` of tensor ``key`` is drawn from a generator seeded with
    ``(seed, key, r)``, so any rank can draw its own rows alone and every layout of ranks gets the same
    model. Matrices: normal(0, ``std``); 1-D: ones for norms, zeros for biases (transformers' init).
    The rows come from the device's generator (a GPU's differs from the CPU's): the same weights on the
    same kind of device."""

    def __init__(self, seed: int, std: float):
        self.seed, self.std = seed, std

    def _seed(self, key: str, row: int) -> int:
        return int.from_bytes(hashlib.blake2b(f"{self.seed}|{key}|{row}".encode(), digest_size=8).digest(), "little") >> 1

    def rows(self, key: str, shape: Sequence[int], lo: int, hi: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if len(shape) == 1:
            fill = 1.0 if "norm" in key.rsplit(".", 2)[-2] else 0.0
            return torch.full((hi - lo,), fill, dtype=dtype, device=device)
        out = torch.empty((hi - lo, *shape[1:]), dtype=dtype, device=device)
        for r in range(lo, hi):
            g = torch.Generator(device=device).manual_seed(self._seed(key, r))
            out[r - lo] = torch.randn(tuple(shape[1:]), generator=g, device=device) * self.std
        return out

    def buffer(self, key: str) -> torch.Tensor | None:
        return None


def weight_source(model_dir: Path, config: dict[str, Any]) -> WeightSource:
    """The source of a model directory's weights: its safetensors, or generated ones for a random preset."""
    if config.get(RANDOM_INIT_KEY):
        return RandomWeights(int(config[RANDOM_INIT_KEY].rsplit("seed", 1)[-1]), float(config.get("initializer_range", 0.02)))
    return CheckpointWeights(model_dir)


def random_init_tag(seed: int) -> str:
    return f"{RANDOM_INIT}-seed{seed}"


def _local(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    from dsft.base.sharding import local_offset

    return local_offset(p)


def materialize(model: nn.Module, source: WeightSource, device: torch.device | str) -> list[str]:
    """Give every meta parameter of ``model`` (sharded by FSDP2 or not) storage on ``device`` for this rank's
    part only, filled from ``source``; persistent buffers take their stored values. Returns the names filled.

    Every rank may call it on its own (no collectives): each reads only its rows.
    """
    device = torch.device(device)
    filled = [n for n, p in model.named_parameters() if p.is_meta]
    for module in model.modules():
        if any(p is not None and p.is_meta for p in module._parameters.values()):
            # Only the meta tensors: the adapters (real already) and the modules' buffers keep their values.
            module._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t, recurse=False)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in filled:
            p = params[name]
            local, lo = _local(p)
            local.copy_(source.rows(base_key(name), tuple(p.shape), lo, lo + local.shape[0], local.dtype, local.device))
        for name, buf in model.named_buffers():
            module_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(module_name)
            if leaf in owner._non_persistent_buffers_set:
                continue
            stored = source.buffer(base_key(name))
            if stored is not None:
                buf.copy_(stored.to(buf.dtype))
            owner._buffers[leaf] = buf.to(device)
    return filled


def term_rows(model: nn.Module, source: WeightSource, pieces: Sequence[Sequence[int]],
              device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The term rows :func:`dsft.adapters.terms.extend_model` would initialise from the loaded embedding and
    head (mean of each term's pieces), read from ``source`` a row at a time on ``device``, the device the base
    is loaded on (generated rows depend on it, and so may the last bit of a mean). Returned on the CPU."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for part, module in (("embed", model.get_input_embeddings()), ("head", model.get_output_embeddings())):
        key, w = base_key(f"{names[id(module)]}.weight"), module.weight
        out[part] = torch.stack([torch.cat([source.rows(key, tuple(w.shape), i, i + 1, w.dtype, torch.device(device)) for i in p])
                                 .float().mean(0) for p in pieces]).cpu()
    return out


def preset_config(config: Any, seed: int, architecture: str) -> dict[str, Any]:
    """config.json of a random preset: the transformers config plus the tag that says its weights are generated."""
    data = json.loads(config.to_json_string(use_diff=False))
    data["architectures"] = [architecture]
    data[RANDOM_INIT_KEY] = random_init_tag(seed)
    return data
