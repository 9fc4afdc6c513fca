"""Several LoRA adapters on one live model, each row of a batch through its own adapter (or none).

PEFT's mixed-batch forward (``adapter_names=``) does not cover ``target_parameters`` layers (its
``ParamWrapper`` raises "does not support mixed adapter batches"), and routed experts are exactly such
layers. So the runtime does it here, without wrapping the model:

* a forward hook on every targeted linear module adds, for each adapter present in the batch,
  ``s (x A^T) B^T`` on that adapter's rows (a row mask, not an index, so no host sync on GPU);
* every routed-experts module gets a forward that runs the base experts once for all tokens with
  grouped GEMMs (:mod:`dsft.kernels.expert_lora`) and adds each adapter's low-rank term on its own
  tokens' (token, expert) pairs, before the activation for ``gate_up_proj`` and after it for
  ``down_proj``: the same math as merging W + s B A per adapter, without forming it.

Outside :meth:`MultiLora.rows` the hooks do nothing: the model is the plain base.
"""
from __future__ import annotations

import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dsft.kernels.expert_lora import LowRank, grouped_mm
from dsft.runtime.weights import AdapterWeights, LinearLora


@dataclass(frozen=True)
class RowGroups:
    """Which rows of the current batch use which adapter: ``(key, mask)`` per adapter present, where
    ``mask`` is a bool tensor ``[batch]`` or None when every row uses that adapter."""

    batch: int
    groups: tuple[tuple[str, torch.Tensor | None], ...]

    @classmethod
    def of(cls, keys: Sequence[str | None], device) -> RowGroups:
        present = [k for k in dict.fromkeys(keys) if k is not None]
        groups = []
        for k in present:
            if all(x == k for x in keys):
                groups.append((k, None))
            else:
                groups.append((k, torch.tensor([x == k for x in keys], device=device)))
        return cls(len(keys), tuple(groups))


def _masked(delta: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``delta`` [N, d] kept on rows where ``mask`` [N] is true."""
    return delta if mask is None else torch.where(mask.unsqueeze(-1), delta, 0)


def _row_mask(mask: torch.Tensor | None, batch: int, n: int) -> torch.Tensor | None:
    """A per-row mask expanded to the ``n`` flattened positions (``n // batch`` per row)."""
    return None if mask is None else mask.repeat_interleave(n // batch)


def _route(top_k_index: torch.Tensor, top_k_weights: torch.Tensor, n_experts: int):
    """(token of each pair, routing weight of each pair, end offset of each expert's run), pairs sorted by expert."""
    expert = top_k_index.reshape(-1)
    order = torch.argsort(expert, stable=True)
    # histc, not bincount: a fixed output size, no host sync on GPU.
    counts = torch.histc(expert.float(), bins=n_experts, min=0, max=n_experts - 1)
    return order // top_k_index.shape[-1], top_k_weights.reshape(-1)[order], torch.cumsum(counts, 0).to(torch.int32)


def _lowrank(x: torch.Tensor, f: LowRank, offs: torch.Tensor) -> torch.Tensor:
    h = grouped_mm(x, f.A.transpose(1, 2), offs)
    return f.scale * grouped_mm(h, f.B.transpose(1, 2), offs)


def experts_forward_mixed(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    act,
    loras: Sequence[tuple[LowRank | None, LowRank | None, torch.Tensor | None]] = (),
) -> torch.Tensor:
    """Routed experts (transformers v5 layout: ``gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) where
    each token may use its own LoRA.

    Args:
        x: tokens [T, H]; top_k_index, top_k_weights: the router's choices [T, k].
        loras: per adapter present, ``(gate_up factors, down factors, token mask [T] or None = all tokens)``.
    Returns:
        [T, H], equal per token to :func:`dsft.kernels.expert_lora.experts_forward_reference` with that
        token's adapter alone.
    """
    token, weight, offs = _route(top_k_index, top_k_weights, gate_up_proj.shape[0])
    xs = x[token]
    pair_masks = [None if m is None else m[token] for _, _, m in loras]
    h = grouped_mm(xs, gate_up_proj.transpose(1, 2), offs)
    for (gu, _, _), m in zip(loras, pair_masks):
        if gu is not None:
            h = h + _masked(_lowrank(xs, gu, offs), m)
    gate, up = h.chunk(2, dim=-1)
    a = act(gate) * up
    y = grouped_mm(a, down_proj.transpose(1, 2), offs)
    for (_, dn, _), m in zip(loras, pair_masks):
        if dn is not None:
            y = y + _masked(_lowrank(a, dn, offs), m)
    y = y * weight.unsqueeze(-1).to(y.dtype)
    return torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))


def experts_supported(module: nn.Module) -> bool:
    """Fused, non-transposed, bias-free gate/up experts: the layout :func:`experts_forward_mixed` computes."""
    gu = getattr(module, "gate_up_proj", None)
    return (
        isinstance(gu, torch.Tensor) and gu.dim() == 3 and isinstance(getattr(module, "down_proj", None), torch.Tensor)
        and not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True)
        and getattr(module, "has_gate", True) and not getattr(module, "has_bias", False)
        and getattr(module, "gate_up_proj_bias", None) is None and hasattr(module, "act_fn")
    )


class MultiLora:
    """Per-module tables of attached adapters' factors, and the hooks that apply them per row."""

    def __init__(self, model: nn.Module, experts_paths: Sequence[str]):
        self.model = model
        self._routing: RowGroups | None = None
        self._linear: dict[str, dict[str, LinearLora]] = {}
        self._experts: dict[str, dict[str, dict[str, LowRank]]] = {}
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._patched: list[nn.Module] = []
        # Routed experts always run through the grouped path while the runtime drives the model, so a row
        # without an adapter computes the same way in a mixed batch as in a batch of its own.
        for path in experts_paths:
            module = model.get_submodule(path)
            if experts_supported(module):
                module.forward = types.MethodType(self._experts_forward(path, type(module).forward), module)
                self._patched.append(module)
        self._patched_paths = {p for p in experts_paths if experts_supported(model.get_submodule(p))}

    # --- tables ------------------------------------------------------------------------------------

    def check(self, weights: AdapterWeights) -> list[str]:
        """Why ``weights`` cannot be served on this model (module missing, shape differs, unsupported experts)."""
        problems = []
        for path, f in weights.linear.items():
            try:
                m = self.model.get_submodule(path)
            except AttributeError:
                problems.append(f"module {path}: not in this model")
                continue
            w = getattr(m, "weight", None)
            if not isinstance(m, nn.Linear) or w is None or tuple(w.shape) != (f.B.shape[0], f.A.shape[1]):
                problems.append(f"module {path}: expects a linear layer of shape {[f.B.shape[0], f.A.shape[1]]}")
        for path, by_param in weights.experts.items():
            if path not in self._patched_paths:
                problems.append(f"module {path}: not a routed-experts layout the runtime serves")
                continue
            m = self.model.get_submodule(path)
            for name, f in by_param.items():
                w = getattr(m, name)
                if (w.shape[0], w.shape[1], w.shape[2]) != (f.B.shape[0], f.B.shape[1], f.A.shape[2]):
                    problems.append(f"module {path}.{name}: expects shape {[f.B.shape[0], f.B.shape[1], f.A.shape[2]]}, "
                                    f"base has {list(w.shape)}")
        return problems

    def add(self, key: str, weights: AdapterWeights) -> None:
        """Put ``key``'s factors into the tables (replacing a previous ``key``), hooking new modules."""
        self.remove(key)
        for path, f in weights.linear.items():
            self._linear.setdefault(path, {})[key] = f
            if path not in self._hooks:
                self._hooks[path] = self.model.get_submodule(path).register_forward_hook(self._linear_hook(path))
        for path, by_param in weights.experts.items():
            self._experts.setdefault(path, {})[key] = by_param

    def remove(self, key: str) -> None:
        """Drop every reference to ``key``'s factors; unhook modules no adapter targets any more."""
        for path in list(self._linear):
            self._linear[path].pop(key, None)
            if not self._linear[path]:
                del self._linear[path]
                self._hooks.pop(path).remove()
        for path in list(self._experts):
            self._experts[path].pop(key, None)
            if not self._experts[path]:
                del self._experts[path]

    def close(self) -> None:
        """Remove every hook and patched forward: the model is plain again."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks.clear()
        self._linear.clear()
        self._experts.clear()
        for module in self._patched:
            module.__dict__.pop("forward", None)
        self._patched.clear()

    @contextmanager
    def rows(self, groups: RowGroups) -> Iterator[None]:
        """Run forwards with ``groups`` deciding which adapter each row uses."""
        previous, self._routing = self._routing, groups
        try:
            yield
        finally:
            self._routing = previous

    def set_rows(self, groups: RowGroups) -> None:
        """Change the row assignment inside :meth:`rows` (after finished rows leave the batch)."""
        self._routing = groups

    # --- the hooks -----------------------------------------------------------------------------------

    def _linear_hook(self, path: str):
        def hook(module, args, out):
            routing = self._routing
            if routing is None:
                return None
            table = self._linear.get(path, {})
            x = args[0]
            for key, mask in routing.groups:
                f = table.get(key)
                if f is None:
                    continue
                delta = F.linear(F.linear(x.to(f.A.dtype), f.A), f.B).to(out.dtype) * f.scale
                if mask is None:
                    out = out + delta
                else:
                    shape = out.shape
                    flat = delta.reshape(-1, shape[-1])
                    out = out + _masked(flat, _row_mask(mask, routing.batch, flat.shape[0])).reshape(shape)
            return out
        return hook

    def _experts_forward(self, path: str, original):
        runtime = self

        def forward(module, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            routing = runtime._routing
            if routing is None or args or kwargs:
                return original(module, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            table = runtime._experts.get(path, {})
            n = hidden_states.shape[0]
            loras = [(table[key].get("gate_up_proj"), table[key].get("down_proj"), _row_mask(mask, routing.batch, n))
                     for key, mask in routing.groups if key in table]
            return experts_forward_mixed(hidden_states, top_k_index, top_k_weights, module.gate_up_proj,
                                         module.down_proj, module.act_fn, loras)
        return forward
