"""Watch the MoE routers during a forward pass: load-balancing loss and expert-usage counts.

transformers' DeepSeek-V2 classes drop the router logits, and the others only return them on
request; a forward hook on each router (found through the architecture table) works the same
for all of them.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from dsft.base.arch import ArchSpec, aux_loss_coef, num_experts


def router_probs(router_logits: torch.Tensor, scores: str = "softmax") -> torch.Tensor:
    """Each token's router probability over the experts (rows sum to 1), in fp32.

    ``scores`` is the architecture's :attr:`dsft.base.arch.ArchSpec.router_scores`: a softmax, or per-expert
    sigmoids normalised per token (DeepSeek-V3's sequence-wise balance loss uses the same normalisation,
    arXiv 2412.19437 eq. 18).
    """
    if scores == "sigmoid":
        s = router_logits.float().sigmoid()
        return s / s.sum(-1, keepdim=True).clamp(min=1e-20)
    return router_logits.float().softmax(-1)


def load_balancing_loss(router_logits: torch.Tensor, top_k_index: torch.Tensor, n_experts: int,
                        scores: str = "softmax") -> torch.Tensor:
    """Switch-Transformer auxiliary loss ``E * sum_i f_i * P_i`` for one layer (arXiv 2101.03961, eq. 4).

    ``f_i`` is the share of token-to-expert assignments that went to expert i, ``P_i`` the mean
    router probability of expert i (:func:`router_probs`). It is 1.0 for a perfectly balanced router.
    """
    probs = router_probs(router_logits, scores)
    counts = torch.histc(top_k_index.reshape(-1).float(), bins=n_experts, min=0, max=n_experts - 1)
    f = counts / counts.sum().clamp(min=1)
    return n_experts * (f * probs.mean(0)).sum()


@dataclass
class RouterProbe:
    """Forward hooks on every router: ``aux_loss()`` and ``imbalance()`` of the last forward pass,
    and (``keep_counts=True``) tokens per expert accumulated per layer.

    The hooks only add to tensors held on the probe, never grow a Python list: inside a compiled
    decoder layer a growing list would be a new guard at every call, i.e. a recompile per step.
    """

    model: nn.Module
    spec: ArchSpec
    keep_counts: bool = False
    global_stats: bool = False
    """Also keep each layer's summed router probabilities and expert loads of the last forward pass, for
    :meth:`aux_loss_global` (data-parallel ranks forming the loss of the whole batch)."""
    counts: dict[int, torch.Tensor] = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def __post_init__(self):
        config = self.model.config
        self.n_experts = num_experts(self.spec, config)
        self.coef = aux_loss_coef(self.spec, config)
        self.n_layers = 0
        self._stats: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        for i, layer in enumerate(self.model.get_decoder().layers):
            try:
                router = layer.get_submodule(self.spec.router_attr)
            except AttributeError:
                continue  # dense layer (e.g. DeepSeek's first layer)
            self._handles.append(router.register_forward_hook(self._hook(i)))
            self.n_layers += 1
        self.reset()

    def _hook(self, layer: int):
        def hook(module, args, output):
            logits, _, index = output
            self._aux = self._aux + load_balancing_loss(logits, index, self.n_experts, self.spec.router_scores)
            load = torch.histc(index.detach().reshape(-1).float(), bins=self.n_experts, min=0, max=self.n_experts - 1)
            self._imbalance = self._imbalance + load.max() / load.mean().clamp(min=1e-9)
            if self.keep_counts:
                self.counts[layer] = self.counts.get(layer, 0) + load.long().cpu()
            if self.global_stats:  # one fixed key per layer, overwritten each pass (no growing container)
                self._stats[layer] = (router_probs(logits, self.spec.router_scores).sum(0), load, logits.shape[0])
        return hook

    def reset(self) -> None:
        """Forget the last forward pass (call before each training step)."""
        self._aux = torch.zeros(())
        self._imbalance = torch.zeros(())

    def aux_loss(self) -> torch.Tensor | None:
        """Mean over MoE layers of the load-balancing loss of the last forward pass."""
        return self._aux / self.n_layers if self.n_layers else None

    def aux_loss_global(self, all_sum: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
        """This rank's share of the load-balancing loss of the batch that all ranks together saw.

        ``E * sum_i f_i * P_i`` is not a mean over tokens (``f`` counts the whole batch's routing), so
        averaging each rank's own loss would not give the single-process loss. Here ``f`` and the token
        count come from the loads summed over ranks (``all_sum``, a sum-all-reduce), and ``P`` from this
        rank's tokens only: summed over ranks, values and gradients equal :meth:`aux_loss` of one process
        that saw the whole batch. Needs ``global_stats=True``.
        """
        if not self.n_layers:
            return None
        layers = sorted(self._stats)
        probs = torch.stack([self._stats[i][0] for i in layers])
        loads = torch.stack([self._stats[i][1] for i in layers])
        tokens = torch.tensor([[float(self._stats[i][2])] for i in layers], device=loads.device)
        totals = all_sum(torch.cat([loads.float(), tokens], 1))
        f = totals[:, :-1] / totals[:, :-1].sum(-1, keepdim=True).clamp(min=1)
        return (self.n_experts * (f * probs / totals[:, -1:]).sum(-1)).sum() / self.n_layers

    def imbalance(self) -> float:
        """Max over mean expert load in the last forward pass, averaged over layers (1.0 = balanced)."""
        return float(self._imbalance) / self.n_layers if self.n_layers else 1.0

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
