"""Adapters with random (non-zero) LoRA factors and term rows, registered like trained ones.

For benchmarks and tests of the runtime: a two-step training run leaves LoRA B close to zero, so
adapters would barely differ from the base and from each other; these differ clearly, are written
in exactly the format training writes (PEFT files + ``terms.safetensors`` + manifest) and go through
training's publish path (:func:`dsft.recipes.publish.publish_adapter`). Their metrics say ``synthetic``; never ship them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from dsft.adapter_format import ESFT, ESFT_FILE, LORA, LORA_GROUPS, TERMS_FILE, adapter_kind
from dsft.adapters.lora import LoraSettings, peft_config, target_shapes
from dsft.adapters.store import write_weights
from dsft.adapters.terms import TermPlan, plan_terms
from dsft.base.loading import LoadedBase
from dsft.recipes.publish import TrainedOn, publish_adapter


def _domain_terms(domain: str) -> list[str]:
    from dsft.domains import resolve_domain

    try:
        return [t for t, _ in resolve_domain(domain).terms]
    except Exception:  # a made-up domain name: no terms unless given
        return []


def make_adapter(
    loaded: LoadedBase,
    domain: str,
    *,
    seed: int = 0,
    r: int = 8,
    alpha: int = 16,
    b_std: float = 0.05,
    terms: Sequence[str] | None = None,
    max_terms: int | None = None,
    targets: Sequence[str] = LORA_GROUPS,
    registry: Any = None,
    fingerprint: Mapping[str, Any] | None = None,
    base_name: str | None = None,
):
    """Write and register a random adapter for ``loaded``; the model is left as it was.

    Args:
        loaded: the base (its model is wrapped with PEFT for the write, then unwrapped).
        domain: its domain (its pack's terms are used unless ``terms`` is given).
        seed: same seed, same factors and rows.
        r, alpha, b_std: LoRA rank, alpha and the std of B (A is N(0, 1/in)).
        max_terms: keep only the first terms that become tokens.
        registry: a URL or an open Registry (default: the usual one).
        fingerprint, base_name: record a different training base than ``loaded`` (to make an adapter
            that the registry must find incompatible with it).
    Returns:
        The registered :class:`dsft.registry.AdapterRecord`.
    """
    from contextlib import nullcontext

    from peft import get_peft_model

    from dsft.registry import Registry, open_registry

    model, tokenizer = loaded.model, loaded.tokenizer
    plan = plan_terms(tokenizer, _domain_terms(domain) if terms is None else list(terms))
    if max_terms is not None:
        plan = type(plan)(plan.terms[:max_terms], plan.start, plan.pieces[:max_terms])
    g = torch.Generator().manual_seed(seed)
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    rows = {}
    for name, weight in (("embed", embed), ("head", head)):
        base_rows = [weight[list(p)].float().mean(0).cpu() for p in plan.pieces]
        noise = torch.randn((len(base_rows), weight.shape[1]), generator=g) * weight.float().std().cpu()
        rows[name] = (torch.stack(base_rows) + noise).contiguous() if base_rows else None
    settings = LoraSettings(r=r, alpha=alpha, targets=tuple(targets))
    cfg = peft_config(model, loaded.spec, settings)
    shapes = target_shapes(model, cfg)
    fp = dict(fingerprint or loaded.fingerprint)
    reg_cm = nullcontext(registry) if isinstance(registry, Registry) else open_registry(registry)
    peft_model = get_peft_model(model, cfg)
    try:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
                elif "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * b_std)

        def write_files(tmp: Path) -> dict[str, Any]:
            write_weights(tmp, peft_model, TermPlan((), plan.start, ()))
            if plan.terms:
                save_file(rows, str(tmp / TERMS_FILE), metadata={"start": str(plan.start), "count": str(len(plan.terms))})
            return {"target_shapes": shapes, "added_tokens": list(plan.terms), "term_start": plan.start,
                    "lora": {"r": r, "alpha": alpha}}

        with reg_cm as reg:
            return _publish(reg, loaded, domain, adapter_kind(LORA, terms=bool(plan.terms)), seed, write_files,
                            fingerprint=fp, base_name=base_name)
    finally:
        peft_model.unload()
        for p in model.parameters():
            p.requires_grad_(False)


def _publish(reg, loaded: LoadedBase, domain: str, kind: str, seed: int, write_files, *,
             fingerprint: Mapping[str, Any], base_name: str | None = None):
    """Register through training's publish path; metrics and recipe say ``synthetic``."""
    if base_name is None:
        base = TrainedOn(loaded.ref.name, loaded.ref.source, fingerprint)
    else:
        base = TrainedOn(base_name, f"path:/synthetic/{base_name}", fingerprint)
    return publish_adapter(reg, domain, kind, base, write_files, recipe={"synthetic": True},
                           metrics={"synthetic": True, "seed": seed}, link_parent=False)


@torch.no_grad()
def make_esft_adapter(loaded: LoadedBase, domain: str, *, seed: int = 0, experts_per_layer: int = 2,
                      noise: float = 0.5, registry: Any = None):
    """Write and register a random ESFT adapter for ``loaded``: per MoE layer, ``experts_per_layer`` experts
    (chosen by ``seed``) whose weights are the base's plus ``noise`` x their std of Gaussian noise.
    ``loaded``'s model is not changed. Returns the registered :class:`dsft.registry.AdapterRecord`."""
    from contextlib import nullcontext

    from dsft.adapters.esft import EXPERT_PARAMS, INDEX_SUFFIX, moe_layers
    from dsft.registry import Registry, open_registry

    g = torch.Generator().manual_seed(seed)
    tensors, shapes, selection = {}, {}, {}
    for i, (path, core, _) in moe_layers(loaded.model, loaded.spec).items():
        n = core.gate_up_proj.shape[0]
        idx = torch.randperm(n, generator=g)[:experts_per_layer].sort().values
        selection[str(i)] = idx.tolist()
        for pname in EXPERT_PARAMS:
            w = getattr(core, pname)[idx].float().cpu()
            w = w + torch.randn(w.shape, generator=g) * w.std() * noise
            tensors[f"{path}.{pname}"] = w.to(getattr(core, pname).dtype).contiguous()
            tensors[f"{path}.{pname}{INDEX_SUFFIX}"] = idx.clone()
            shapes[f"{path}.{pname}"] = list(getattr(core, pname).shape)
    reg_cm = nullcontext(registry) if isinstance(registry, Registry) else open_registry(registry)

    def write_files(tmp: Path) -> dict[str, Any]:
        save_file(tensors, str(tmp / ESFT_FILE), metadata={"format": "dsft-esft", "version": "1"})
        esft = {"method": "token", "p": 0.2, "lora": False, "selection": selection, "tokens": 0}
        return {"target_shapes": shapes, "added_tokens": [], "term_start": len(loaded.tokenizer), "esft": esft}

    with reg_cm as reg:
        return _publish(reg, loaded, domain, ESFT, seed, write_files, fingerprint=loaded.fingerprint)
