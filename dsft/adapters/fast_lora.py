"""Swap PEFT's ``target_parameters`` forwards for low-rank ones, keeping PEFT's parameters and files.

PEFT wraps a targeted ``nn.Parameter`` in a ``ParamWrapper`` that, on every forward, forms W + s B A
and runs the original module with it. That costs a full copy of W per step and, in backward, a full
weight-gradient GEMM for the copy. Here the same wrappers keep their ``lora_A``/``lora_B``
parameters (so saving, loading and PEFT compatibility are untouched), but their forward computes
the low-rank path on the activations instead:

* routed experts (the nested wrappers of ``gate_up_proj`` and ``down_proj``): one fused pass,
  :func:`dsft.kernels.expert_lora.experts_forward`, grouped GEMMs on the routed tokens;
* 2-D parameters (shared experts) and PEFT's own LoRA ``Linear`` (attention): ``x W^T + s (x A^T) B^T``
  computed in the activations' dtype.

PEFT's layout for a 3-D parameter W [E, out, in]: ``lora_A.weight`` is [E*r, in] (viewed E x r x in),
``lora_B.weight`` is [out, r*E] (viewed out x r x E), delta_e = B[:, :, e] @ A[e].
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from dsft.adapters.qlora import expert_weights
from dsft.base.arch import supports_fused_experts
from dsft.kernels.expert_lora import LowRank, experts_forward

ADAPTER = "default"


def _is_param_wrapper(module: nn.Module) -> bool:
    return type(module).__name__ == "ParamWrapper"


def _chain(wrapper: nn.Module) -> tuple[dict[str, nn.Module], nn.Module]:
    """The nested wrappers by parameter name, and the wrapped module at the bottom."""
    by_param, module = {}, wrapper
    while _is_param_wrapper(module):
        by_param[module.parameter_name] = module
        module = module.base_layer
    return by_param, module


def _active(wrapper: nn.Module) -> bool:
    return ADAPTER in wrapper.lora_A and not wrapper.disable_adapters and not wrapper.merged and ADAPTER in wrapper.active_adapters


def _expert_lowrank(wrapper: nn.Module | None, weight: torch.Tensor) -> LowRank | None:
    if wrapper is None or not _active(wrapper):
        return None
    n_experts, out_features, in_features = weight.shape
    A = wrapper.lora_A[ADAPTER].weight
    B = wrapper.lora_B[ADAPTER].weight
    r = A.shape[0] // n_experts
    # B is stored expert-minor; grouped GEMMs need each expert's [out, r] block contiguous (a few MB copy).
    return LowRank(A.view(n_experts, r, in_features), B.view(out_features, r, n_experts).permute(2, 0, 1).contiguous(),
                   wrapper.scaling[ADAPTER])


def _fast_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    by_param, experts = _chain(self)
    gate_up, down = expert_weights(experts, hidden_states.dtype)  # dequantised here under QLoRA

    def folded(w: torch.Tensor, name: str) -> torch.Tensor | None:
        # A weight that trains itself (an ESFT stage on fused experts after a LoRA stage) must be read
        # through its parameter, or it would get no gradient: the folded buffer is not the parameter.
        return None if w.requires_grad else getattr(experts, FOLDED[name], None)

    return experts_forward(
        hidden_states, top_k_index, top_k_weights, gate_up, down, experts.act_fn,
        _expert_lowrank(by_param.get("gate_up_proj"), gate_up), _expert_lowrank(by_param.get("down_proj"), down),
        gate_up_folded=folded(gate_up, "gate_up_proj"), down_folded=folded(down, "down_proj"),
    )


FOLDED = {"gate_up_proj": "dsft_gate_up_folded", "down_proj": "dsft_down_folded"}
"""Attributes of a fused experts module after :func:`fold_lora`: gate_up_proj's storage [E, 2I, H + r]
(B in the last r input columns) and down_proj's [E, H + r, I] (A in the last r output rows)."""


def _fold(core: nn.Module, name: str, lora: nn.Module) -> tuple[nn.Module, str, nn.Module, int] | None:
    """Move ``core.<name>`` into a buffer with r more columns (gate_up: input dim) or rows (down: output dim);
    the parameter becomes a view of the buffer, so nothing is duplicated."""
    w = core._parameters.get(name)
    if w is None or not _active(lora) or hasattr(core, FOLDED[name]):
        return None  # NF4 weights (dequantised per call: nothing to fold into), or done already
    n_experts = w.shape[0]
    rank = lora.lora_A[ADAPTER].weight.shape[0] // n_experts
    dim = 2 if name == "gate_up_proj" else 1
    shape = list(w.shape)
    shape[dim] += rank
    buffer = w.new_empty(shape)
    head = buffer.narrow(dim, 0, w.shape[dim])
    head.copy_(w)
    w.data = head
    setattr(core, FOLDED[name], buffer)
    return core, name, lora, w.shape[dim]


def _refresh(core: nn.Module, name: str, lora: nn.Module, width: int) -> None:
    """Copy the trained factor into its folded slot: gate_up's B [E, 2I, r], down's A [E, r, I]."""
    low = _expert_lowrank(lora, getattr(core, name))
    buffer = getattr(core, FOLDED[name])
    if name == "gate_up_proj":
        buffer[:, :, width:].copy_(low.B)
    else:
        buffer[:, width:, :].copy_(low.A)


DENSE_FOLDED = "dsft_lora_folded"
"""Attribute of a LoRA'd ``nn.Linear`` after ``fold_lora(dense=True)``: [out + r, in], the weight's storage with
the LoRA A in its last r rows."""


def _fold_dense(module: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    base = module.base_layer
    if not isinstance(base, nn.Linear) or hasattr(base, DENSE_FOLDED) or not _active(module):
        return None
    w, rank = base.weight, module.lora_A[ADAPTER].weight.shape[0]
    buffer = w.new_empty(w.shape[0] + rank, w.shape[1])
    buffer[: w.shape[0]].copy_(w)
    w.data = buffer[: w.shape[0]]
    setattr(base, DENSE_FOLDED, buffer)
    return module, base


@torch.no_grad()
def fold_lora(model: nn.Module, dense: bool = False) -> int:
    """Give each LoRA'd routed-experts weight room for one LoRA factor, refreshed from the factor by a
    pre-hook on the decoder before every forward:

    * gate_up_proj [E, 2I, H] -> [E, 2I, H + r] with B in the last r input columns: ``x W^T + s (x A^T) B^T``
      is one grouped GEMM of ``[x | s x A^T]`` (no separate B product, no pass adding it to the output);
    * down_proj [E, H, I] -> [E, H + r, I] with A in the last r output rows: ``a W^T`` and ``a A^T`` come
      out of one grouped GEMM, and the backward's input gradient out of one (no [T*k, I] add).

    With ``dense``, also every LoRA'd ``nn.Linear`` on the fast path (attention, shared experts): W [out, in] ->
    [out + r, in] with A in the last r rows (:mod:`dsft.kernels.linear_part`), three GEMMs fewer per linear and
    step. Off by default until measured on a GPU.

    For one process on a GPU (FSDP2 shards the weights; the buffers would not follow). Returns how many
    modules were folded.
    """
    folded, modules = [], 0
    for wrapper in _outermost_wrappers(model):
        if wrapper.__dict__.get("forward") is None or wrapper.forward.__func__ is not _fast_experts_forward:
            continue
        by_param, core = _chain(wrapper)
        done = [f for name, lora in by_param.items() if (f := _fold(core, name, lora)) is not None]
        folded += done
        modules += bool(done)
    dense_folded = []
    for module in model.modules() if dense else ():
        forward = module.__dict__.get("forward")
        if forward is not None and forward.__func__ in (_fast_lora_linear_forward, _fast_param_linear_forward) \
                and (f := _fold_dense(module)) is not None:
            dense_folded.append(f)
    if not folded and not dense_folded:
        return 0

    def refresh(module, args):
        with torch.no_grad():
            for core, name, lora, width in folded:
                if _active(lora):
                    _refresh(core, name, lora, width)
            for lora, base in dense_folded:
                if _active(lora):
                    getattr(base, DENSE_FOLDED)[base.out_features :].copy_(lora.lora_A[ADAPTER].weight)

    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    base_model.get_decoder().register_forward_pre_hook(refresh)
    return modules + len(dense_folded)


def _low_rank(self, x: torch.Tensor) -> torch.Tensor:
    """s (x A^T) B^T in the activations' dtype. PEFT keeps LoRA weights in fp32 and upcasts x to
    them, which turns two cheap bf16 GEMMs into fp32 ones plus a copy of x; the fp32 weights stay
    the optimizer's master copy here, only the product runs in bf16."""
    A, B = self.lora_A[ADAPTER].weight, self.lora_B[ADAPTER].weight
    return self.scaling[ADAPTER] * F.linear(F.linear(x, A.to(x.dtype)), B.to(x.dtype))


def _folded_linear(self, base: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``x W^T (+ b) + s (x A^T) B^T`` with A folded under W (:func:`fold_lora`): one GEMM gives both
    ``x W^T`` and ``x A^T``."""
    from dsft.kernels.linear_part import linear_part

    A, B = self.lora_A[ADAPTER].weight, self.lora_B[ADAPTER].weight
    y = linear_part(x, getattr(base, DENSE_FOLDED), A)  # A's values are in the buffer (refreshed each step)
    out = base.out_features
    y, h = y[..., :out], y[..., out:]
    if base.bias is not None:
        y = y + base.bias
    return y + self.scaling[ADAPTER] * F.linear(h, B.to(x.dtype))


def _dense_lora(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if not _active(self):
        return base(x)
    if hasattr(base, DENSE_FOLDED) and not base.weight.requires_grad:  # a weight that trains reads its parameter
        return _folded_linear(self, base, x)
    return base(x) + _low_rank(self, x)


def _fast_param_linear_forward(self, x, *args, **kwargs):
    return _dense_lora(self, self.base_layer, x)  # base: an nn.Linear, or its NF4 stand-in under QLoRA


def _fast_lora_linear_forward(self, x, *args, **kwargs):
    if args or kwargs:
        y = self.base_layer(x, *args, **kwargs)
        return y + _low_rank(self, x) if _active(self) else y
    return _dense_lora(self, self.base_layer, x)


def _outermost_wrappers(model: nn.Module) -> list[nn.Module]:
    wrappers = [m for m in model.modules() if _is_param_wrapper(m)]
    inner = {id(m.base_layer) for m in wrappers}
    return [m for m in wrappers if id(m) not in inner]


def enable_fast_lora(model: nn.Module) -> int:
    """Patch every supported ParamWrapper of ``model`` (a PeftModel); returns how many were patched.

    Unsupported shapes (expert biases, several adapters on one wrapper, dropout) keep PEFT's forward.
    """
    patched = 0
    for wrapper in _outermost_wrappers(model):
        by_param, core = _chain(wrapper)
        if any(len(w.lora_A) != 1 for w in by_param.values()):
            continue
        if supports_fused_experts(core) and set(by_param) <= {"gate_up_proj", "down_proj"}:
            wrapper.forward = types.MethodType(_fast_experts_forward, wrapper)
            patched += 1
        elif isinstance(core, nn.Linear) and set(by_param) == {"weight"}:
            wrapper.forward = types.MethodType(_fast_param_linear_forward, wrapper)
            patched += 1
    for module in model.modules():  # PEFT's own LoRA Linear (attention): same low-rank path in bf16
        if type(module).__name__ == "Linear" and hasattr(module, "lora_A") and isinstance(module.base_layer, nn.Linear) \
                and len(module.lora_A) == 1 and ADAPTER in module.lora_A and _no_dropout(module):
            module.forward = types.MethodType(_fast_lora_linear_forward, module)
            patched += 1
    return patched


def _no_dropout(module: nn.Module) -> bool:
    return isinstance(module.lora_dropout[ADAPTER], nn.Identity) and not module.use_dora.get(ADAPTER, False)


def disable_fast_lora(model: nn.Module) -> None:
    """Back to PEFT's own forwards (e.g. before merging)."""
    for module in model.modules():
        module.__dict__.pop("forward", None)
