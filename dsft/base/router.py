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


def expert_load(top_k_index: torch.Tensor, n_experts: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Token-to-expert assignments per expert (fp32), counting each token's ``weights`` (1 for all by default)."""
    index = top_k_index.reshape(len(top_k_index), -1)
    w = torch.ones(index.shape, device=index.device) if weights is None else weights.float()[:, None].expand(index.shape)
    return torch.zeros(n_experts, device=index.device).index_add_(0, index.reshape(-1), w.reshape(-1))


def load_balancing_loss(router_logits: torch.Tensor, top_k_index: torch.Tensor, n_experts: int,
                        scores: str = "softmax", weights: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer auxiliary loss ``E * sum_i f_i * P_i`` for one layer (arXiv 2101.03961, eq. 4).

    ``f_i`` is the share of token-to-expert assignments that went to expert i, ``P_i`` the mean
    router probability of expert i (:func:`router_probs`). It is 1.0 for a perfectly balanced router.
    ``weights`` (one per token, 0 or 1) leaves tokens out: padding is not routed traffic, and the loss over a
    padded tail is the only gradient that reaches it (no label does), through hidden states that start from
    the pad token's zero embedding. On the DeepSeek-V2-Lite shape in bf16 that made every step-1 gradient NaN;
    with padding left out the run is finite (``benchmarks/results/2026-12-01-h200-issue21-nan.md``).
    """
    probs = router_probs(router_logits, scores)
    w = torch.ones(len(probs), device=probs.device) if weights is None else weights.float()
    counts = expert_load(top_k_index, n_experts, w)
    f = counts / counts.sum().clamp(min=1)
    mean_probs = (probs * w[:, None]).sum(0) / w.sum().clamp(min=1)
    return n_experts * (f * mean_probs).sum()


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
        self._stats: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
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
            w = self._token_weights(len(logits))
            self._aux = self._aux + load_balancing_loss(logits, index, self.n_experts, self.spec.router_scores, w)
            load = expert_load(index.detach(), self.n_experts, w)
            self._imbalance = self._imbalance + load.max() / load.mean().clamp(min=1e-9)
            if self.keep_counts:
                self.counts[layer] = self.counts.get(layer, 0) + load.long().cpu()
            if self.global_stats:  # one fixed key per layer, overwritten each pass (no growing container)
                probs = router_probs(logits, self.spec.router_scores)
                if w is None:
                    self._stats[layer] = (probs.sum(0), load, torch.full((), float(len(logits)), device=logits.device))
                else:
                    self._stats[layer] = ((probs * w[:, None]).sum(0), load, w.sum())
        return hook

    def _token_weights(self, n_tokens: int) -> torch.Tensor | None:
        """1.0 for the tokens of the forward pass that count, 0.0 for padding, as :meth:`reset` was told; None:
        all count. A forward of another size than the mask's (an evaluation batch) counts every token."""
        mask = self._mask
        return mask if mask is not None and mask.numel() == n_tokens else None

    def reset(self, attention_mask: torch.Tensor | None = None) -> None:
        """Forget the last forward pass (call before each training step). ``attention_mask`` ([rows, seq], 1 on
        real tokens) is the next forward's: its padding then stays out of the loss and the expert counts."""
        # On the forward's device from the start: a CPU scalar that became a CUDA tensor after the first MoE
        # layer failed the next compiled layer's guard on it, one recompile per stage (measured on an H200).
        device = attention_mask.device if attention_mask is not None else next(self.model.parameters()).device
        self._aux = torch.zeros((), device=device)
        self._imbalance = torch.zeros((), device=device)
        self._mask = None if attention_mask is None else attention_mask.reshape(-1).to(torch.float32)

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
        tokens = torch.stack([self._stats[i][2] for i in layers]).reshape(-1, 1).to(loads.device)
        totals = all_sum(torch.cat([loads.float(), tokens], 1))
        f = totals[:, :-1] / totals[:, :-1].sum(-1, keepdim=True).clamp(min=1)
        return (self.n_experts * (f * probs / totals[:, -1:]).sum(-1)).sum() / self.n_layers

    def imbalance(self) -> float:
        """Max over mean expert load in the last forward pass, averaged over layers (1.0 = balanced)."""
        return float(self.imbalance_tensor())

    def imbalance_tensor(self) -> torch.Tensor:
        """:meth:`imbalance` as a float64 scalar on the forward's device: reading it is the caller's device sync
        (the training loop reads it with the step's other figures)."""
        if not self.n_layers:
            return torch.ones((), dtype=torch.float64, device=self._imbalance.device)
        return self._imbalance.double() / self.n_layers

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
