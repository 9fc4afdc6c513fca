"""Expert-specialised fine-tuning (ESFT, arXiv 2407.01906): which routed experts a domain uses.

Per MoE layer, each routed expert is scored on a domain sample by its average gate score (ESFT-Gate)
or by its share of the token selections (ESFT-Token); scores are normalised per layer and the
smallest set of experts whose scores sum to at least ``p`` is selected (paper defaults: p = 0.1 for
gate, 0.2 for token).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

Method = Literal["gate", "token"]
DEFAULT_P = {"gate": 0.1, "token": 0.2}


def select_experts(scores: Sequence[float], p: float) -> list[int]:
    """The smallest set of experts (highest scores first) whose normalised scores sum to >= p."""
    total = float(sum(scores))
    if total <= 0:
        return []
    order = sorted(range(len(scores)), key=lambda e: -scores[e])
    chosen, acc = [], 0.0
    for e in order:
        chosen.append(e)
        acc += scores[e] / total
        if acc >= p - 1e-12:
            break
    return sorted(chosen)


@torch.no_grad()
def score_experts(model, spec, examples, method: Method = "token", batch_size: int = 16) -> dict[int, list[float]]:
    """Per MoE layer, each routed expert's score on ``examples`` (padding excluded)."""
    from dsft.base.arch import num_experts

    n = num_experts(spec, model.config)
    sums: dict[int, torch.Tensor] = {}
    current_mask: list[torch.Tensor] = []

    def hook_for(layer: int):
        def hook(module, args, output):
            logits, _, index = output
            keep = current_mask[0].reshape(-1).bool().to(logits.device)
            if method == "gate":
                s = logits.float().softmax(-1)[keep].sum(0)
            else:
                s = torch.bincount(index[keep].reshape(-1), minlength=n).float()
            sums[layer] = sums.get(layer, 0) + s.cpu()
        return hook

    handles = []
    for i, layer in enumerate(model.get_decoder().layers):
        try:
            handles.append(layer.get_submodule(spec.router_attr).register_forward_hook(hook_for(i)))
        except AttributeError:
            continue
    model.eval()
    device = next(model.parameters()).device
    try:
        for lo in range(0, examples.input_ids.shape[0], batch_size):
            mask = examples.attention_mask[lo : lo + batch_size]
            current_mask[:] = [mask]
            model(input_ids=examples.input_ids[lo : lo + batch_size].to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {layer: (s / s.sum().clamp(min=1e-12)).tolist() for layer, s in sorted(sums.items())}


def expert_selection(base: str, domain: str, method: Method = "token", p: float | None = None,
                     sample_tokens: int = 131072, device: str | None = None) -> dict:
    """Score and select experts for ``domain`` on ``base`` from up to ``sample_tokens`` of its raw training text."""
    from dsft.base import load_base
    from dsft.data.files import Record
    from dsft.data.tokenize import build_examples
    from dsft.domains import resolve_domain
    from dsft.recipes.sources import corpus

    p = DEFAULT_P[method] if p is None else p
    loaded = load_base(base, device=device)
    pack = resolve_domain(domain)
    seq_len = 256
    ex = build_examples(loaded.tokenizer, [Record.raw(t) for t in corpus(pack).raw_train], seq_len)
    ex = ex.select(range(min(len(ex), max(1, sample_tokens // seq_len))))
    scores = score_experts(loaded.model, loaded.spec, ex, method)
    layers = {str(layer): {"selected": select_experts(s, p), "scores": [round(x, 5) for x in s]} for layer, s in scores.items()}
    n_experts = len(next(iter(scores.values()))) if scores else 0
    chosen = sum(len(v["selected"]) for v in layers.values())
    return {"domain": pack.name, "base": loaded.ref.name, "method": method, "p": p,
            "sample_tokens": int(ex.attention_mask.sum()), "layers": layers,
            "selected_share": chosen / max(1, n_experts * len(layers))}
