"""Several LoRA adapters on one live model, each row of a batch through its own adapter (or none).

PEFT's mixed-batch forward (``adapter_names=``) does not cover ``target_parameters`` layers (its
``ParamWrapper`` raises "does not support mixed adapter batches"), and routed experts are exactly such
layers. So the runtime does it here, without wrapping the model. For the adapters present in a batch,
their factors are stacked along the rank (``A = [A_1; A_2; ...]``, ``B = [B_1, B_2, ...]``), so that

    y = x W^T + ((x A^T) * M) B^T

where the column mask ``M`` keeps, for each row, only the rank block of that row's adapter (all zero for a
row without one): one low-rank product per module whatever the mix, and no host sync (no indexing by rows).

* Every targeted linear module gets that as its forward; with every attached adapter in the batch (a
  CUDA graph's step), A is stacked under W so that ``x W^T`` and ``x A^T`` are one GEMM
  (:mod:`dsft.runtime.fused_linear`).
* Every routed-experts module gets a forward that runs the base experts once for all (token, expert) pairs
  with grouped GEMMs, each pair adding its own masked low-rank term (:mod:`dsft.runtime.mixed_experts`).
* An ESFT adapter brings its own weights for a few experts. A (token, expert) pair of its rows that
  lands on one of them is computed with those weights instead: the base pass gives such pairs routing
  weight 0 and a second grouped pass over the adapters' stacked slices gives them their weight (every
  other pair weight 0 there), so rows of other adapters in the same batch are untouched.

Decoding one token at a time is bound by launching kernels, so the forwards are plain patched methods (no
hook machinery) and the scale is folded into B when an adapter is read. Outside :meth:`MultiLora.rows` the
model computes exactly as the plain base.
"""
from __future__ import annotations

import types
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from dsft.base.arch import supports_fused_experts
from dsft.kernels import lora_up, moe_gemm
from dsft.kernels.expert_lora import LowRank
from dsft.runtime.fp8_experts import scales_of
from dsft.runtime.fused_linear import FusedWeights, fused_lora_linear
from dsft.runtime.mixed_experts import experts_forward_mixed
from dsft.runtime.row_groups import RowGroups, stack_experts, stack_linear
from dsft.runtime.weights import AdapterWeights, ExpertSlices, LinearLora

MIXES_KEPT = 4
"""Mixes of adapters whose stacked factors are kept (see ``MultiLora._stacks``)."""


class MultiLora:
    """Per-module tables of attached adapters' factors, and the forwards that apply them per row."""

    def __init__(self, model: nn.Module, experts_paths: Sequence[str]):
        self.model = model
        self._routing: RowGroups | None = None
        self._linear: dict[str, dict[str, LinearLora]] = {}
        self._experts: dict[str, dict[str, dict[str, LowRank]]] = {}
        self._slices: dict[str, dict[str, ExpertSlices]] = {}
        self._patched: dict[str, nn.Module] = {}
        self._path_of: dict[int, str] = {}  # id(patched module) -> its path
        # Stacked factors per mix of adapters (the keys of a RowGroups), most recently used last: continuous
        # batching alternates between the running rows' mix and the mix of rows being prefilled, and
        # re-stacking (a concatenation per module) at every switch would cost more than the forward.
        self._stacks: OrderedDict[tuple[str, ...], dict[tuple, object]] = OrderedDict()
        self._current: dict[tuple, object] = {}
        self._keys: set[str] = set()
        self._all: tuple[str, ...] = ()
        self._fused = FusedWeights()
        self.version = 0
        """Bumped by every :meth:`add` and :meth:`remove` (what a captured CUDA graph read may have moved)."""
        # Routed experts always run through the grouped path while the runtime drives the model, so a row
        # without an adapter computes the same way in a mixed batch as in a batch of its own.
        self._experts_paths = set()
        for path in experts_paths:
            module = model.get_submodule(path)
            if supports_fused_experts(module):
                module.forward = types.MethodType(self._experts_forward(path, type(module).forward), module)
                self._patched[path] = module
                self._experts_paths.add(path)

    def experts_modules(self) -> list[nn.Module]:
        """The routed-experts modules whose forward the runtime drives (the ones FP8 experts may replace)."""
        return [self._patched[path] for path in sorted(self._experts_paths)]

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
            if path not in self._experts_paths:
                problems.append(f"module {path}: not a routed-experts layout the runtime serves")
                continue
            m = self.model.get_submodule(path)
            for name, f in by_param.items():
                w = getattr(m, name)
                if (w.shape[0], w.shape[1], w.shape[2]) != (f.B.shape[0], f.B.shape[1], f.A.shape[2]):
                    problems.append(f"module {path}.{name}: expects shape {[f.B.shape[0], f.B.shape[1], f.A.shape[2]]}, "
                                    f"base has {list(w.shape)}")
        for path, sl in weights.expert_slices.items():
            if path not in self._experts_paths:
                problems.append(f"module {path}: not a routed-experts layout the runtime serves")
                continue
            m = self.model.get_submodule(path)
            n = m.gate_up_proj.shape[0]
            if (sl.gate_up_proj.shape[1:] != m.gate_up_proj.shape[1:] or sl.down_proj.shape[1:] != m.down_proj.shape[1:]
                    or len(sl.index) == 0 or int(sl.index.min()) < 0 or int(sl.index.max()) >= n):
                problems.append(f"module {path}: ESFT experts {sl.index.tolist()} of shape {list(sl.gate_up_proj.shape[1:])} "
                                f"do not fit its {n} experts of shape {list(m.gate_up_proj.shape[1:])}")
        return problems

    def add(self, key: str, weights: AdapterWeights) -> None:
        """Put ``key``'s factors into the tables (replacing a previous ``key``), patching new modules."""
        self.remove(key)
        self._keys.add(key)
        self._all = tuple(sorted(self._keys))
        for path, f in weights.linear.items():
            self._linear.setdefault(path, {})[key] = f
            if path not in self._patched:
                module = self.model.get_submodule(path)
                module.forward = types.MethodType(self._linear_forward(path), module)
                self._patched[path] = module
                self._path_of[id(module)] = path
        for path, by_param in weights.experts.items():
            self._experts.setdefault(path, {})[key] = by_param
        for path, sl in weights.expert_slices.items():
            self._slices.setdefault(path, {})[key] = sl
        self._stacks.clear()
        self._current = {}

    def remove(self, key: str) -> None:
        """Drop every reference to ``key``'s factors; give modules no adapter targets their own forward back."""
        self._keys.discard(key)
        self._all = tuple(sorted(self._keys))
        self.version += 1
        for path in list(self._linear):
            self._linear[path].pop(key, None)
            if not self._linear[path]:
                del self._linear[path]
                module = self._patched.pop(path)
                self._path_of.pop(id(module), None)
                module.__dict__.pop("forward", None)
                self._fused.release(path, module)
        for path in list(self._experts):
            self._experts[path].pop(key, None)
            if not self._experts[path]:
                del self._experts[path]
                self._release_experts(path)
        for path in list(self._slices):
            self._slices[path].pop(key, None)
            if not self._slices[path]:
                del self._slices[path]
        self._stacks.clear()
        self._current = {}

    def close(self) -> None:
        """Restore every patched forward: the model is plain again."""
        for path, module in self._patched.items():
            module.__dict__.pop("forward", None)
            self._fused.release(path, module)
        for path in self._experts:
            self._release_experts(path)
        self._patched.clear()
        self._path_of.clear()
        self._linear.clear()
        self._experts.clear()
        self._slices.clear()
        self._stacks.clear()
        self._current = {}
        self._keys.clear()
        self._all = ()
        self.version += 1

    def _release_experts(self, path: str) -> None:
        module = self.model.get_submodule(path)
        for name in ("gate_up_proj", "down_proj"):
            self._fused.release(path, module, name)

    def keys(self) -> tuple[str, ...]:
        """The attached adapters, sorted (a :class:`RowGroups` over all of them stacks every one's factors)."""
        return self._all

    def current_stacks(self, keys: tuple[str, ...]) -> dict[tuple, object]:
        """The stacked factors computed so far for the mix ``keys`` (kept by whoever must keep them alive)."""
        return self._stacks_of(keys)

    @contextmanager
    def rows(self, groups: RowGroups) -> Iterator[None]:
        """Run forwards with ``groups`` deciding which adapter each row uses."""
        previous = self._routing
        self.set_rows(groups)
        try:
            yield
        finally:
            self._routing = previous
            if previous is not None:
                self._current = self._stacks_of(previous.keys)

    def set_rows(self, groups: RowGroups) -> None:
        """Change the row assignment inside :meth:`rows` (after finished rows leave the batch)."""
        self._routing = groups
        self._current = self._stacks_of(groups.keys)

    def _stacks_of(self, keys: tuple[str, ...]) -> dict[tuple, object]:
        hit = self._stacks.get(keys)
        if hit is None:
            hit = self._stacks[keys] = {}
            while len(self._stacks) > MIXES_KEPT:
                self._stacks.popitem(last=False)
        else:
            self._stacks.move_to_end(keys)
        return hit

    # --- stacked factors for the adapters present ---------------------------------------------------

    def _stacked(self, kind: str, path: str, routing: RowGroups, table: dict, pick=lambda f: f):
        """(stacked factors, their groups, their ranks) for the adapters of ``routing`` that target ``path``."""
        stacks = self._current
        cache_key = (kind, path)
        hit = stacks.get(cache_key)
        if hit is None:
            present = [(g, pick(table[k])) for g, k in enumerate(routing.keys) if k in table and pick(table[k]) is not None]
            if not present:
                hit = (None, (), ())
            else:
                groups = tuple(g for g, _ in present)
                factors = [f for _, f in present]
                stacked = stack_linear(factors) if kind == "linear" else stack_experts(factors)
                ranks = tuple(int(f.A.shape[0 if kind == "linear" else 1]) for f in factors)
                hit = (stacked, groups, ranks)
            stacks[cache_key] = hit
        return hit

    def _mask(self, routing: RowGroups, groups: tuple[int, ...], ranks: tuple[int, ...], n: int, dtype):
        """Column mask for ``n`` flattened positions (``n // batch`` per row), or None when every row uses it."""
        if routing.uniform is not None and len(groups) == 1:
            return None
        return routing.column_mask(groups, ranks, n, dtype)

    def linear_lora(self, module: nn.Module, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """``module``'s LoRA for the current rows, for code that applies it itself (the absorbed MLA decode,
        :mod:`dsft.runtime.mla_decode`): ``(A [R, in], B [out, R], column mask [n, R] or None)``, or None."""
        routing = self._routing
        path = self._path_of.get(id(module))
        if routing is None or not routing.keys or path is None:
            return None
        f, groups, ranks = self._stacked("linear", path, routing, self._linear.get(path, {}))
        if f is None:
            return None
        return f.A, f.B, self._mask(routing, groups, ranks, n, f.A.dtype)

    def gated_up(self, mlp: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``silu(gate_proj(x)) * up_proj(x)`` of a SwiGLU MLP (:mod:`dsft.runtime.fused_mlp`) whose two projections
        carry the current rows' LoRA: each projection's ``[W; A]`` GEMM, then both masked up-projections and the
        activation in one kernel (:func:`dsft.kernels.lora_up.swiglu_up`). None where that does not apply (no GPU
        kernel or too many rows, not every attached adapter in the batch, the two projections stacked differently):
        the MLP's own forward then runs, through the linears' forwards."""
        routing = self._routing
        gate_path, up_path = self._path_of.get(id(mlp.gate_proj)), self._path_of.get(id(mlp.up_proj))
        if routing is None or not routing.keys or routing.keys != self._all or gate_path is None or up_path is None:
            return None
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        if not lora_up.usable(rows, rows):
            return None
        fg, groups, ranks = self._stacked("linear", gate_path, routing, self._linear.get(gate_path, {}))
        fu, groups_u, ranks_u = self._stacked("linear", up_path, routing, self._linear.get(up_path, {}))
        if fg is None or fu is None or (groups, ranks) != (groups_u, ranks_u):
            return None
        wg = self._fused.get(gate_path, mlp.gate_proj, fg.A, self.version)
        wu = self._fused.get(up_path, mlp.up_proj, fu.A, self.version)
        if wg is None or wu is None or wg.out_features != wu.out_features:
            return None
        mask = self._mask(routing, groups, ranks, n, x.dtype)
        width = wg.out_features
        full_g = F.linear(rows, wg.stacked, wg.bias)
        full_u = F.linear(rows, wu.stacked, wu.bias)
        args = (full_g[:, :width], full_g[:, width:], fg.B, full_u[:, :width], full_u[:, width:], fu.B,
                None if mask is None else mask.view(n, -1))
        out = moe_gemm.or_none(lora_up.swiglu_up, *args)
        if out is None:  # the kernel cannot compile here (the kernels are now off): the same math in torch ops
            out = lora_up.swiglu_up_reference(*args)
        return out.view(*x.shape[:-1], width)

    # --- the forwards ----------------------------------------------------------------------------------

    def _linear_forward(self, path: str):
        runtime = self

        def forward(module, x):
            routing = runtime._routing
            if routing is None or not routing.keys:
                return F.linear(x, module.weight, module.bias)
            f, groups, ranks = runtime._stacked("linear", path, routing, runtime._linear.get(path, {}))
            if f is None:
                return F.linear(x, module.weight, module.bias)
            mask = runtime._mask(routing, groups, ranks, x.numel() // x.shape[-1], x.dtype)
            # With every attached adapter in the batch (always, in a CUDA graph), x A^T shares W's GEMM.
            fused = runtime._fused.get(path, module, f.A, runtime.version) if routing.keys == runtime._all else None
            if fused is not None:
                return fused_lora_linear(x, fused, f.B, mask)
            y = F.linear(x, module.weight, module.bias)
            h = F.linear(x, f.A)
            if mask is not None:
                h.mul_(mask.view(h.shape))
            # y += h B^T as one GEMM accumulating into y (beta = 1): a decode step is bound by kernel launches, and
            # an out-of-place addmm would first copy y into its result. y is F.linear's fresh contiguous output.
            y.view(-1, y.shape[-1]).addmm_(h.view(-1, h.shape[-1]), f.B.t())
            return y
        return forward

    def _experts_forward(self, path: str, original):
        runtime = self

        def forward(module, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            routing = runtime._routing
            scales = scales_of(module)
            if routing is None and not (args or kwargs) and scales[0] is not None:  # FP8 experts, no adapter
                return experts_forward_mixed(hidden_states, top_k_index, top_k_weights, module.gate_up_proj,
                                             module.down_proj, module.act_fn, scales=scales)
            if routing is None or args or kwargs:
                return original(module, hidden_states, top_k_index, top_k_weights, *args, **kwargs)
            table = runtime._experts.get(path, {})
            n = hidden_states.shape[0]
            projections, fused = [], []
            for name in ("gate_up_proj", "down_proj"):
                f, groups, ranks = (runtime._stacked(name, path, routing, table, lambda t, name=name: t.get(name))
                                    if routing.keys else (None, (), ()))
                projections.append(None if f is None else (f, runtime._mask(routing, groups, ranks, n, hidden_states.dtype)))
                # As for linears: with every attached adapter in the batch, x A_e^T shares the experts' GEMM.
                fused.append(runtime._fused.get(path, module, f.A, runtime.version, name)
                             if f is not None and routing.keys == runtime._all else None)
            own = runtime._own_experts(path, routing, module.gate_up_proj.shape[0]) if routing.keys else None
            if own is None:
                return experts_forward_mixed(hidden_states, top_k_index, top_k_weights, module.gate_up_proj,
                                             module.down_proj, module.act_fn, *projections, fused=(fused[0], fused[1]),
                                             scales=scales)
            remap, slices = own
            # Row r's pair (t, j) goes to its adapter's slice remap[group(r), expert] when there is one.
            groups = routing.positions_group(n)
            target = remap[groups.where(groups >= 0, remap.shape[0] - 1)[:, None], top_k_index]
            mine = target >= 0
            y = experts_forward_mixed(hidden_states, top_k_index, top_k_weights.masked_fill(mine, 0), module.gate_up_proj,
                                      module.down_proj, module.act_fn, *projections, fused=(fused[0], fused[1]),
                                      scales=scales)
            return y + experts_forward_mixed(hidden_states, target.clamp(min=0), top_k_weights.masked_fill(~mine, 0),
                                             slices.gate_up_proj, slices.down_proj, module.act_fn)
        return forward

    def _own_experts(self, path: str, routing: RowGroups, n_experts: int) -> tuple[torch.Tensor, ExpertSlices] | None:
        """For the ESFT adapters of ``routing`` with experts in ``path``: (``remap`` [groups + 1, E], their slices
        stacked), where ``remap[g, e]`` is the stacked slice replacing expert e for group g, or -1 (last row: no adapter)."""
        table = self._slices.get(path)
        if not table:
            return None
        stacks = self._current
        hit = stacks.get(("slices", path), False)
        if hit is False:
            present = [(g, table[k]) for g, k in enumerate(routing.keys) if k in table]
            hit = None
            if present:
                device = present[0][1].index.device
                remap = torch.full((len(routing.keys) + 1, n_experts), -1, dtype=torch.long, device=device)
                start = 0
                for g, sl in present:
                    remap[g, sl.index] = torch.arange(start, start + len(sl.index), device=device)
                    start += len(sl.index)
                stacked = ExpertSlices(torch.cat([sl.index for _, sl in present]),
                                       torch.cat([sl.gate_up_proj for _, sl in present]),
                                       torch.cat([sl.down_proj for _, sl in present]))
                hit = (remap, stacked)
            stacks[("slices", path)] = hit
        return hit
