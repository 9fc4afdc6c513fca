"""An adapter directory read into memory for the runtime: LoRA factors by module, term rows, its tokenizer.

PEFT interprets its own format: the adapter's config is injected into a *meta-device* copy of the base
(no memory, no weights), its state dict is loaded into that skeleton with PEFT's own key mapping (so
nested ``target_parameters`` wrappers, rank/alpha patterns and transformers weight conversions are read
the way ``PeftModel.from_pretrained`` reads them), and the factors are then taken out of the skeleton's
LoRA layers. The live model is never wrapped. Skeletons are kept per (base config, adapter config), and
PEFT's load is watched the first time one is used: when it only renames the file's keys (the usual case),
the next adapters of that config are copied straight into the factors PEFT chose, without its remapping
(which walks the model for every key). An ESFT adapter has no PEFT files: its selected experts' weights are
read as slices (``ExpertSlices``), which the runtime uses in place of the base's experts for its own rows.

Every file is read once, as bytes, and those bytes are hashed (:mod:`dsft.runtime.verified_read`) while they
are parsed; nothing parsed from them leaves before the hash matched, so what is loaded is what was verified.
"""
from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.adapter_format import ESFT_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, TERMS_FILE, Manifest
from dsft.adapters.esft import EXPERT_PARAMS
from dsft.atomic import sha256_json
from dsft.errors import IntegrityError, UsageError
from dsft.kernels.expert_lora import LowRank
from dsft.runtime.tensor_file import tensor_views
from dsft.runtime.verified_read import read_hashing, read_verified


@dataclass(frozen=True)
class LinearLora:
    """``y += (x A^T) B^T`` on one linear module: A [r, in], B [out, r] with the LoRA scale folded into B."""

    A: torch.Tensor
    B: torch.Tensor


@dataclass(frozen=True)
class ExpertSlices:
    """An ESFT adapter's own weights for some experts of one routed-experts module (the base layout)."""

    index: torch.Tensor
    """[S] the experts these slices replace."""
    gate_up_proj: torch.Tensor
    """[S, 2I, H]"""
    down_proj: torch.Tensor
    """[S, H, I]"""


@dataclass
class AdapterWeights:
    """What the runtime needs of one adapter, on the base's device and in its dtype."""

    linear: dict[str, LinearLora] = field(default_factory=dict)
    """Linear module path (``model.layers.0.self_attn.q_proj``) -> factors."""
    experts: dict[str, dict[str, LowRank]] = field(default_factory=dict)
    """Routed-experts module path -> {"gate_up_proj" | "down_proj": A [E, r, in], B [E, out, r] (scale folded
    into B, ``scale`` 1)}."""
    expert_slices: dict[str, ExpertSlices] = field(default_factory=dict)
    """Routed-experts module path -> an ESFT adapter's replacement experts."""
    terms: tuple[torch.Tensor, torch.Tensor] | None = None
    """(embed rows, head rows) of the added tokens, or None."""
    added_tokens: tuple[str, ...] = ()
    term_start: int = 0

    def tensors(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for f in self.linear.values():
            out += [f.A, f.B]
        for by_param in self.experts.values():
            for f in by_param.values():
                out += [f.A, f.B]
        for sl in self.expert_slices.values():
            out += [sl.index, sl.gate_up_proj, sl.down_proj]
        if self.terms is not None:
            out += list(self.terms)
        return out

    def nbytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.tensors())


def _peft_config(raw: bytes):
    from peft import LoraConfig, PeftType

    cfg = json.loads(raw)
    if cfg.get("peft_type") != PeftType.LORA.value:
        raise UsageError(f"adapter type {cfg.get('peft_type')!r} is not served by the dsft runtime (LoRA only)")
    config = LoraConfig.from_peft_type(**cfg) if hasattr(LoraConfig, "from_peft_type") else LoraConfig(**cfg)
    unsupported = [name for name, bad in (
        ("use_dora", config.use_dora), ("lora_bias", config.lora_bias), ("modules_to_save", config.modules_to_save),
        ("trainable_token_indices", config.trainable_token_indices), ("layer_replication", config.layer_replication),
    ) if bad]
    if unsupported:
        raise UsageError(f"adapter uses {', '.join(unsupported)}, which the dsft runtime does not serve; "
                         "load it with plain PEFT instead")
    config.inference_mode = True
    return config


@dataclass
class _Skeleton:
    """A cached skeleton, and where its adapters' file keys land once PEFT's load has been watched once.

    Mutable: what PEFT's key mapping does is learned on the skeleton's first use (:func:`_load_with_peft`).
    """

    model: Any
    key_map: dict[str, Any] | None = None
    """File key -> the LoRA ``nn.Linear`` whose weight it is, when PEFT's load was a pure renaming."""
    peft_only: bool = False
    """PEFT's load reshaped, combined or dropped tensors: it is asked every time."""

    def lora_linears(self) -> list[Any]:
        from peft.tuners.lora.layer import LoraLayer

        return [factors[name] for m in self.model.modules() if isinstance(m, LoraLayer)
                for factors in (m.lora_A, m.lora_B) for name in factors]


_SKELETONS: OrderedDict[str, _Skeleton] = OrderedDict()
_SKELETONS_KEPT = 2
_SKELETON_LOCK = threading.Lock()


@contextmanager
def _skeleton(model_config, raw_config: bytes, peft_config, device, dtype) -> Iterator[_Skeleton]:
    """The base's architecture on the meta device with the adapter injected, its LoRA factors allocated on
    ``device`` in ``dtype`` for the duration (the state dict is copied straight there).

    Building it (PEFT's injection) costs more than the rest of an attach, and adapters trained by one recipe
    share their config: the last few skeletons are kept, their factors back on meta (no memory) between uses.
    """
    from peft import inject_adapter_in_model
    from transformers import AutoModelForCausalLM

    key = sha256_json(model_config.to_dict()) + hashlib.sha256(raw_config).hexdigest()
    with _SKELETON_LOCK:  # one attach at a time uses a skeleton
        skeleton = _SKELETONS.pop(key, None)
        if skeleton is None:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(copy.deepcopy(model_config))
            skeleton = _Skeleton(inject_adapter_in_model(peft_config, model, low_cpu_mem_usage=True))
        linears = skeleton.lora_linears()
        try:
            for lin in linears:
                lin.weight = torch.nn.Parameter(torch.empty(lin.weight.shape, device=device, dtype=dtype),
                                                requires_grad=False)
            yield skeleton
        finally:
            for lin in linears:
                lin.weight = torch.nn.Parameter(torch.empty(lin.weight.shape, device="meta"), requires_grad=False)
            _SKELETONS[key] = skeleton
            while len(_SKELETONS) > _SKELETONS_KEPT:
                _SKELETONS.popitem(last=False)


def _load_with_peft(skeleton: _Skeleton, state: dict[str, torch.Tensor], directory: Path) -> None:
    """Load ``state`` with PEFT's own key mapping; on a skeleton's first use, learn that mapping when it
    only renames keys (the dict PEFT hands to ``load_state_dict`` holds the very tensors of ``state``).

    PEFT's remapping walks the model's modules for every key (~1 s for a lite-shape adapter); a learned
    map makes the next attach of this config a plain copy (:func:`_load_mapped`).
    """
    from peft import set_peft_model_state_dict

    model, seen = skeleton.model, {}
    load = model.load_state_dict

    def watched(state_dict, *args, **kwargs):
        seen.update(state_dict)
        return load(state_dict, *args, **kwargs)

    model.load_state_dict = watched  # an instance attribute, for this call only
    try:
        result = set_peft_model_state_dict(model, state, adapter_name="default")
    finally:
        del model.load_state_dict
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        _refuse_keys(directory, missing, result.unexpected_keys)
    if skeleton.key_map is None and not skeleton.peft_only:
        skeleton.key_map = _renaming(skeleton, state, seen)
        skeleton.peft_only = skeleton.key_map is None


def _renaming(skeleton: _Skeleton, state: dict[str, torch.Tensor], loaded: dict[str, Any]) -> dict[str, Any] | None:
    """``{file key: LoRA linear}`` if PEFT loaded each tensor of ``state`` unchanged into one LoRA factor and
    filled every factor; None otherwise. (Tensors are matched by identity: all are alive, ids are unique.)"""
    by_id = {id(t): k for k, t in state.items()}
    linears = {id(lin) for lin in skeleton.lora_linears()}
    key_map: dict[str, Any] = {}
    for target, value in loaded.items():
        path, _, name = target.rpartition(".")
        try:
            module = skeleton.model.get_submodule(path)
        except AttributeError:
            return None
        key = by_id.get(id(value))
        if key is None or key in key_map or name != "weight" or id(module) not in linears:
            return None
        key_map[key] = module
    return key_map if len(key_map) == len(state) == len(linears) else None


def _load_mapped(key_map: dict[str, Any], state: dict[str, torch.Tensor], directory: Path) -> None:
    """Copy each tensor of ``state`` into the factor PEFT put it in before (one host->device copy each).

    Raises:
        IntegrityError: a key the config has no factor for, a factor without a key, or a shape that differs.
    """
    missing = sorted(set(key_map) - set(state))
    unexpected = sorted(set(state) - set(key_map))
    if missing or unexpected:
        _refuse_keys(directory, missing, unexpected)
    with torch.no_grad():
        for key, tensor in state.items():
            weight = key_map[key].weight
            if tensor.shape != weight.shape:
                raise IntegrityError(f"adapter {directory}: {PEFT_WEIGHTS_FILE} holds {key} of shape "
                                     f"{list(tensor.shape)} where its config makes {list(weight.shape)}; "
                                     "re-export or retrain it")
            weight.copy_(tensor)


def _refuse_keys(directory: Path, missing: list[str], unexpected: list[str]):
    bad = (missing or unexpected)[0]
    raise IntegrityError(f"adapter {directory}: {PEFT_WEIGHTS_FILE} does not match its config "
                         f"({'missing' if missing else 'unexpected'} {bad}); re-export or retrain it")


def _param_wrapper_chain(module) -> tuple[list, Any]:
    from peft.tuners.lora.layer import ParamWrapper

    chain = []
    while isinstance(module, ParamWrapper):
        chain.append(module)
        module = module.base_layer
    return chain, module


def _extract(skeleton, adapter: str, device, dtype) -> AdapterWeights:
    from peft.tuners.lora.layer import Linear as LoraLinear
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    out = AdapterWeights()
    inner = {id(m.base_layer) for m in skeleton.modules() if isinstance(m, ParamWrapper)}

    def cast(t: torch.Tensor) -> torch.Tensor:  # a copy: the skeleton's factors are reused by the next adapter
        return t.detach().to(device=device, dtype=dtype, copy=True).contiguous()

    for path, module in skeleton.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A or id(module) in inner:
            continue
        if isinstance(module, LoraLinear):
            out.linear[path] = LinearLora(cast(module.lora_A[adapter].weight),
                                          cast(module.lora_B[adapter].weight * module.scaling[adapter]))
        elif isinstance(module, ParamWrapper):
            chain, core = _param_wrapper_chain(module)
            if isinstance(core, torch.nn.Linear) and [w.parameter_name for w in chain] == ["weight"]:
                w = chain[0]
                out.linear[path] = LinearLora(cast(w.lora_A[adapter].weight), cast(w.lora_B[adapter].weight * w.scaling[adapter]))
                continue
            if getattr(core, "is_transposed", False) or not all(w.parameter_name in EXPERT_PARAMS for w in chain):
                raise UsageError(f"adapter targets {path}.{chain[0].parameter_name}, a parameter layout the dsft "
                                 "runtime does not serve; load it with plain PEFT instead")
            by_param = {}
            for w in chain:
                weight = getattr(core, w.parameter_name)
                n_experts, out_features, in_features = weight.shape
                A = w.lora_A[adapter].weight
                B = w.lora_B[adapter].weight
                r = A.shape[0] // n_experts
                # PEFT's layout for W [E, out, in]: A is [E*r, in] (expert-major), B is [out, r*E] (expert-minor).
                by_param[w.parameter_name] = LowRank(
                    cast(A.view(n_experts, r, in_features)),
                    cast(B.view(out_features, r, n_experts).permute(2, 0, 1) * w.scaling[adapter]),
                    1.0,
                )
            out.experts[path] = by_param
        else:
            raise UsageError(f"adapter puts a {type(module).__name__} LoRA layer on {path}, which the dsft runtime "
                             "does not serve; load it with plain PEFT instead")
    return out


def read_adapter(directory: str | Path, manifest: Manifest, model_config, *, device, dtype) -> AdapterWeights:
    """Read an adapter directory (already resolved through the registry) for the runtime.

    Args:
        directory: the adapter directory.
        manifest: its ``dsft_adapter.json`` as recorded by the registry.
        model_config: the loaded base's ``config`` (its architecture is rebuilt on the meta device).
        device, dtype: where the factors and rows will live (the base's).

    Raises:
        IntegrityError: a file is missing, changed, or its weights do not cover the config's targets.
        UsageError: a LoRA variant the runtime does not serve (DoRA, biases, embedding LoRA, ...).
    """
    from safetensors.torch import load as load_safetensors

    directory = Path(directory)
    if manifest.is_esft:
        weights = AdapterWeights(expert_slices=_read_esft(directory, manifest, device, dtype))
    else:
        weights = _read_lora(directory, manifest, model_config, device, dtype)
    added = manifest.added_tokens
    if added:
        rows = load_safetensors(read_verified(directory, manifest, TERMS_FILE))
        embed, head = rows["embed"], rows["head"]
        if embed.shape[0] != len(added) or head.shape != embed.shape:
            raise IntegrityError(f"adapter {directory}: {TERMS_FILE} holds {embed.shape[0]} rows for "
                                 f"{len(added)} added tokens; re-export or retrain it")
        weights.terms = (embed.to(device=device, dtype=dtype), head.to(device=device, dtype=dtype))
        weights.added_tokens = added
        weights.term_start = int(manifest.term_start or 0)
    return weights


def _read_lora(directory: Path, manifest: Manifest, model_config, device, dtype) -> AdapterWeights:
    raw_config = read_verified(directory, manifest, PEFT_CONFIG_FILE)
    config = _peft_config(raw_config)
    data, verified = read_hashing(directory, manifest, PEFT_WEIGHTS_FILE)
    try:  # parsed while the hash runs; nothing leaves before verified()
        state = tensor_views(data, str(directory / PEFT_WEIGHTS_FILE))
        with _skeleton(model_config, raw_config, config, device, dtype) as skeleton:
            if skeleton.key_map is not None:
                _load_mapped(skeleton.key_map, state, directory)
            else:
                _load_with_peft(skeleton, state, directory)
            del state, data  # the file's bytes, once on the device
            weights = _extract(skeleton.model, "default", device, dtype)
    except Exception:
        verified()  # a damaged file fails to parse: name it as damaged rather than report the parse error
        raise
    verified()
    return weights


def _read_esft(directory: Path, manifest: Manifest, device, dtype) -> dict[str, ExpertSlices]:
    """``{experts module path: slices}`` from ``esft.safetensors`` (``<path>.<param>`` + ``<path>.<param>.experts``)."""
    from dsft.adapters.esft import INDEX_SUFFIX

    data, verified = read_hashing(directory, manifest, ESFT_FILE)
    try:
        tensors = tensor_views(data, str(directory / ESFT_FILE))
    finally:
        verified()  # before anything parsed is used; a damaged file is named as such rather than by a parse error
    out = {}
    for key in tensors:
        if not key.endswith(".gate_up_proj"):
            continue
        path = key.removesuffix(".gate_up_proj")
        names = (key, key + INDEX_SUFFIX, f"{path}.down_proj", f"{path}.down_proj{INDEX_SUFFIX}")
        if any(n not in tensors for n in names):
            raise IntegrityError(f"adapter {directory}: {ESFT_FILE} lacks {next(n for n in names if n not in tensors)}; "
                                 "retrain it")
        index = tensors[names[1]].long()
        gu, down = tensors[names[0]], tensors[names[2]]
        if not torch.equal(index, tensors[names[3]].long()) or gu.shape[0] != len(index) or down.shape[0] != len(index):
            raise IntegrityError(f"adapter {directory}: {ESFT_FILE} slices of {path} disagree on their experts; retrain it")
        out[path] = ExpertSlices(index.to(device), gu.to(device=device, dtype=dtype), down.to(device=device, dtype=dtype))
    return out


def extended_tokenizer(tokenizer, added_tokens: tuple[str, ...], term_start: int):
    """A copy of the base tokenizer with an adapter's terms added, numbered from ``term_start``.

    Raises:
        IncompatibleError: the base tokenizer's size is not where the adapter's terms start.
    """
    from dsft.errors import IncompatibleError

    tok = copy.deepcopy(tokenizer)
    if not added_tokens:
        return tok
    if len(tok) != term_start:
        raise IncompatibleError(f"the adapter's terms start at id {term_start} but the base tokenizer has "
                                f"{len(tok)} tokens; retrain the adapter on this base")
    tok.add_tokens(list(added_tokens))
    return tok
