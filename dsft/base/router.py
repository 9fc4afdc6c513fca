"""Watch the MoE routers during a forward pass: load-balancing loss and expert-usage counts.

transformers' DeepSeek-V2 classes drop the router logits, and the others only return them on
request; a forward hook on each router (found through the architecture table) works the same
for all of them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from dsft.base.arch import ArchSpec, aux_loss_coef, num_experts


def load_balancing_loss(router_logits: torch.Tensor, top_k_index: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss ``E * sum_i f_i * P_i`` for one layer (arXiv 2101.03961, eq. 4).

    ``f_i`` is the share of token-to-expert assignments that went to expert i, ``P_i`` the mean
    router probability of expert i. It is 1.0 for a perfectly balanced router.
    """
    probs = router_logits.float().softmax(-1)
    counts = torch.bincount(top_k_index.reshape(-1), minlength=n_experts).float()
    f = counts / counts.sum().clamp(min=1)
    return n_experts * (f * probs.mean(0)).sum()


@dataclass
class RouterProbe:
    """Forward hooks on every router; ``aux_loss()`` after a forward pass, ``counts`` accumulated per layer."""

    model: nn.Module
    spec: ArchSpec
    keep_counts: bool = False
    _calls: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    counts: dict[int, torch.Tensor] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def __post_init__(self):
        config = self.model.config
        self.n_experts = num_experts(self.spec, config)
        self.coef = aux_loss_coef(self.spec, config)
        layers = self.model.get_decoder().layers
        for i, layer in enumerate(layers):
            try:
                router = layer.get_submodule(self.spec.router_attr)
            except AttributeError:
                continue  # dense layer (e.g. DeepSeek's first layer)
            self._handles.append(router.register_forward_hook(self._hook(i)))

    def _hook(self, layer: int):
        def hook(module, args, output):
            logits, _, index = output
            self._calls.append((layer, logits, index))
            if self.keep_counts:
                c = torch.bincount(index.detach().reshape(-1).cpu(), minlength=self.n_experts)
                self.counts[layer] = self.counts.get(layer, 0) + c
        return hook

    def reset(self) -> None:
        self._calls.clear()

    def aux_loss(self) -> torch.Tensor | None:
        """Mean over MoE layers of the load-balancing loss of the last forward pass."""
        if not self._calls:
            return None
        losses = [load_balancing_loss(logits, index, self.n_experts) for _, logits, index in self._calls]
        return torch.stack(losses).mean()

    def imbalance(self) -> float:
        """Max over mean expert load in the last forward pass, averaged over layers (1.0 = balanced)."""
        vals = []
        for _, _, index in self._calls:
            c = torch.bincount(index.detach().reshape(-1), minlength=self.n_experts).float()
            vals.append((c.max() / c.mean().clamp(min=1e-9)).item())
        return sum(vals) / len(vals) if vals else 1.0

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
