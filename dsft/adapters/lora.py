"""LoRA on attention, shared experts and routed experts, wired through PEFT.

Module names come from the architecture table; targets are spelled as full module paths so a
subset of layers (e.g. the top third in a two-stage recipe) is just a shorter list. Routed
experts are fused 3-D parameters in transformers v5, so they go through PEFT's
``target_parameters``; the saved files are ordinary PEFT ``adapter_config.json`` +
``adapter_model.safetensors``.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dsft.adapter_format import LORA_GROUPS
from dsft.base.arch import ArchSpec
from dsft.errors import UsageError


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_GROUPS
    """Which groups get LoRA: any of attention, shared_experts, routed_experts."""
    layers: tuple[int, ...] | None = None
    """Decoder layer indices to adapt; None = all."""

    def __post_init__(self):
        bad = [t for t in self.targets if t not in LORA_GROUPS]
        if bad:
            raise UsageError(f"lora.targets: unknown group {bad[0]!r}; choose from {', '.join(LORA_GROUPS)}")
        if self.r <= 0:
            raise UsageError(f"lora.r: must be > 0, got {self.r}")


def decoder_layers(model) -> nn.ModuleList:
    return model.get_decoder().layers


def layer_indices(model, fraction_from_top: float | None = None) -> tuple[int, ...]:
    n = len(decoder_layers(model))
    if fraction_from_top is None:
        return tuple(range(n))
    k = max(1, round(n * fraction_from_top))
    return tuple(range(n - k, n))


def _prefix(model) -> str:
    """Module-path prefix of the decoder layers, e.g. ``model.layers``."""
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers:
            return name
    raise RuntimeError("decoder layers not found")


def lora_targets(model, spec: ArchSpec, settings: LoraSettings) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) as full names for the chosen groups and layers."""
    prefix = _prefix(model)
    names = {name for name, _ in model.named_modules()}
    layers = settings.layers if settings.layers is not None else range(len(decoder_layers(model)))
    modules, params = [], []
    for i in layers:
        base = f"{prefix}.{i}"
        if "attention" in settings.targets:
            modules += [f"{base}.self_attn.{p}" for p in spec.attention if f"{base}.self_attn.{p}" in names]
        if "shared_experts" in settings.targets:
            # As parameters, not modules: PEFT rewrites module targets named gate/up/down_proj onto the fused
            # routed experts for models whose MLP layout changed in transformers v5 (deepseek_v2, qwen2_moe).
            params += [f"{base}.mlp.{p}.weight" for p in spec.shared_experts if f"{base}.mlp.{p}" in names]
        if "routed_experts" in settings.targets and f"{base}.{spec.experts_attr}" in names:
            params += [f"{base}.{spec.experts_attr}.gate_up_proj", f"{base}.{spec.experts_attr}.down_proj"]
    return modules, params


def peft_config(model, spec: ArchSpec, settings: LoraSettings):
    from peft import LoraConfig

    modules, params = lora_targets(model, spec, settings)
    if not modules and not params:
        raise UsageError("lora: the chosen targets and layers match no module of this model; widen lora.targets or lora.layers")
    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=modules or None, target_parameters=params or None, bias="none", task_type="CAUSAL_LM",
    )


def target_shapes(model, config) -> dict[str, list[int]]:
    """Shapes of the base parameters an adapter modifies (what the registry checks a new base against)."""
    shapes = {}
    params = dict(model.named_parameters())
    for name in config.target_modules or []:
        key = f"{name}.weight"
        if key in params:
            shapes[key] = list(params[key].shape)
    for name in config.target_parameters or []:
        if name in params:
            shapes[name] = list(params[name].shape)
    return shapes


def attach_lora(model, spec: ArchSpec, settings: LoraSettings, fast: bool = True):
    """Wrap ``model`` with fresh LoRA adapters (B = 0, so outputs are unchanged). Returns the PeftModel.

    Args:
        fast: compute expert and shared-expert LoRA on the activations (:mod:`dsft.adapters.fast_lora`)
            instead of PEFT's materialised W + BA; same parameters, same files, same results.
    """
    from peft import get_peft_model

    from dsft.adapters.fast_lora import enable_fast_lora

    peft_model = get_peft_model(model, peft_config(model, spec, settings))
    if fast:
        enable_fast_lora(peft_model)
    return peft_model
