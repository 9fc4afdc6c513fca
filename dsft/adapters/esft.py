"""Expert-specialised fine-tuning (ESFT; Wang et al., DeepSeek, arXiv 2407.01906).

1. Score every routed expert of every MoE layer on a sample of domain data (:func:`score_experts`):
   * ESFT-Gate: the average gate (affinity) score ``g_i = 1/N sum_j 1/L_j sum_k softmax(router logits)_{i,k}``;
   * ESFT-Token: the token-selection ratio ``r_i = 1/N sum_j 1/L_j sum_k 1[i in top-K(k)] / K``;
   averaged over the tokens of each sequence, then over sequences, as in the paper (section 3.2).
2. Per layer, normalise the scores to sum to 1 and keep the smallest set of experts whose scores
   reach ``p`` (:func:`select_experts`; the paper's defaults are p = 0.1 for gate, 0.2 for token).
3. Train only those experts. transformers v5 fuses a layer's experts into 3-D parameters
   ``gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``, so "only those experts" is a gradient mask
   along the expert dimension (:class:`expert_grad_mask`); with ``lora`` the same mask applies to the
   LoRA factors of the fused parameters, and the product is merged into the slices when saving.
4. Save only the selected slices (:func:`save_esft`), and put them back onto a base (:func:`load_esft`).

File format of an ESFT adapter directory (manifest ``kind`` = ``esft`` or ``esft+terms``)::

    esft.safetensors   "<param>" -> W[idx] ([k, out, in]), "<param>.experts" -> idx (int64 [k]),
                       for <param> = model.layers.<l>.<experts>.gate_up_proj / down_proj
    terms.safetensors  as for LoRA adapters (when the run added terms)
    dsft_adapter.json  with "esft": {"method", "p", "tokens", "selection": {"<layer>": [experts]}, ...}
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsft.adapter_format import ESFT_FILE, TERMS_FILE, Manifest
from dsft.base.arch import ArchSpec, top_k
from dsft.base.router import router_probs
from dsft.errors import IncompatibleError, UsageError

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
METHODS = ("gate", "token")
DEFAULT_P = {"gate": 0.1, "token": 0.2}
INDEX_SUFFIX = ".experts"
SLOT = "dsft_slot"
"""Attribute of an experts module while its slots are permuted for training (:mod:`dsft.adapters.esft_slices`):
expert index -> slot, int64 [E]."""


@dataclass(frozen=True)
class ExpertScores:
    """Per MoE layer (decoder layer index), one score per routed expert for each method."""

    gate: dict[int, list[float]]
    token: dict[int, list[float]]
    tokens: int
    sequences: int

    def of(self, method: str) -> dict[int, list[float]]:
        if method not in METHODS:
            raise UsageError(f"unknown ESFT method {method!r}; choose gate or token")
        return self.gate if method == "gate" else self.token


def _core(module: nn.Module) -> nn.Module:
    """The experts module under PEFT's ``ParamWrapper`` nesting (itself when not wrapped)."""
    while type(module).__name__ == "ParamWrapper":
        module = module.base_layer
    return module


def _wrappers(module: nn.Module) -> dict[str, nn.Module]:
    """PEFT's wrappers around the fused expert parameters, by parameter name."""
    out = {}
    while type(module).__name__ == "ParamWrapper":
        out[module.parameter_name] = module
        module = module.base_layer
    return out


def slot_index(experts: nn.Module, index: torch.Tensor) -> torch.Tensor:
    """Where experts ``index`` are stored in the fused weights now: at their own index, or at their slots
    while :func:`dsft.adapters.esft_slices.trainable_slices` is active."""
    slot = getattr(experts, SLOT, None)
    return index if slot is None else slot.cpu()[index.cpu()]


def moe_layers(model, spec: ArchSpec) -> dict[int, tuple[str, nn.Module, nn.Module]]:
    """``{layer index: (experts module path, experts module, router)}`` for the MoE layers of ``model``
    (a transformers model; PEFT-wrapped experts are unwrapped)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.get_decoder().layers
    prefix = next(name for name, m in base.named_modules() if m is layers)
    out = {}
    for i, layer in enumerate(layers):
        try:
            router = layer.get_submodule(spec.router_attr)
            experts = layer.get_submodule(spec.experts_attr)
        except AttributeError:
            continue  # a dense layer (DeepSeek's first)
        core = _core(experts)
        if getattr(core, "gate_up_proj", None) is None or core.gate_up_proj.dim() != 3:
            raise UsageError(f"layer {i}: routed experts are not fused 3-D parameters; ESFT needs transformers >= 5")
        out[i] = (f"{prefix}.{i}.{spec.experts_attr}", core, router)
    return out


@torch.no_grad()
def score_experts(model, spec: ArchSpec, examples, batch_size: int = 16) -> ExpertScores:
    """Average gate score and token-selection ratio of every routed expert on ``examples``.

    Args:
        model: a transformers MoE model (or a PeftModel around one).
        spec: its architecture table entry.
        examples: :class:`dsft.data.tokenize.Examples`; padding (attention mask 0) is not scored.

    Returns:
        ExpertScores; each layer's gate scores sum to ~1 (router probabilities, see
        :func:`dsft.base.router.router_probs`), token ratios to exactly 1.
    """
    layers = moe_layers(model, spec)
    k = top_k(spec, model.config)
    device = next(model.parameters()).device
    sums = {i: (torch.zeros(0), torch.zeros(0)) for i in layers}
    mask_now: list[torch.Tensor] = []

    def hook(i: int):
        def fn(module, args, output):
            logits, _, index = output
            mask = mask_now[0]
            n_experts = logits.shape[-1]
            probs = router_probs(logits, spec.router_scores).view(*mask.shape, n_experts)
            chosen = torch.zeros_like(probs.view(-1, n_experts)).scatter_(1, index.view(-1, k), 1.0).view_as(probs) / k
            per_seq = [(x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1) for x in (probs, chosen)]
            g, t = sums[i]
            sums[i] = (per_seq[0].sum(0).cpu() + (g if g.numel() else 0), per_seq[1].sum(0).cpu() + (t if t.numel() else 0))
        return fn

    handles = [router.register_forward_hook(hook(i)) for i, (_, _, router) in layers.items()]
    model.eval()
    n_seq, n_tok = 0, 0
    try:
        for lo in range(0, len(examples), batch_size):
            ids = examples.input_ids[lo : lo + batch_size].to(device)
            mask = examples.attention_mask[lo : lo + batch_size].to(device)
            pos = examples.position_ids[lo : lo + batch_size].to(device)
            keep = mask.sum(1) > 0
            ids, mask, pos = ids[keep], mask[keep], pos[keep]
            if not len(ids):
                continue
            mask_now[:] = [mask.float()]
            # packed rows: each example attends only to itself, as in training
            model(input_ids=ids, position_ids=pos, use_cache=False)
            n_seq += len(ids)
            n_tok += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
    if n_seq == 0:
        raise UsageError("no tokens to score the experts on; give a non-empty domain sample")
    gate = {i: (g / n_seq).tolist() for i, (g, _) in sums.items()}
    token = {i: (t / n_seq).tolist() for i, (_, t) in sums.items()}
    return ExpertScores(gate, token, n_tok, n_seq)


def select_experts(scores: Sequence[float], p: float) -> list[int]:
    """The smallest set of experts whose normalised scores sum to >= ``p`` (one layer).

    Scores are normalised to sum to 1; experts are taken by descending score (ties: lower index
    first) until the running sum reaches ``p``.

    Args:
        scores: one score >= 0 per expert (normalised or not).
        p: the share of the layer's total score to cover, in (0, 1].

    Returns:
        The selected expert indices, ascending; empty when every score is 0.

    Raises:
        UsageError: ``p`` outside (0, 1].
    """
    if not 0 < p <= 1:
        raise UsageError(f"ESFT p must be in (0, 1], got {p}")
    total = float(sum(scores))
    if total <= 0:
        return []
    chosen, covered = [], 0.0
    for e in sorted(range(len(scores)), key=lambda e: (-scores[e], e)):
        chosen.append(e)
        covered += scores[e] / total
        if covered >= p - 1e-9:  # float sums of exact shares (0.1 + 0.1) must count as reaching p
            break
    return sorted(chosen)


def select_layers(scores: Mapping[int, Sequence[float]], p: float) -> dict[int, tuple[int, ...]]:
    """:func:`select_experts` for every layer: ``{layer: experts}``."""
    return {int(layer): tuple(select_experts(s, p)) for layer, s in scores.items()}


def selection_report(scores: ExpertScores, method: str, p: float, selection: Mapping[int, Sequence[int]]) -> dict[str, Any]:
    """The JSON form of a scoring: per layer the normalised scores and the selected experts."""
    layers = {}
    n_experts = 0
    for i, s in sorted(scores.of(method).items()):
        total = sum(s) or 1.0
        n_experts = len(s)
        layers[str(i)] = {"selected": list(selection[i]), "scores": [round(x / total, 6) for x in s]}
    chosen = sum(len(v) for v in selection.values())
    return {"method": method, "p": p, "sample_tokens": scores.tokens, "sequences": scores.sequences, "layers": layers,
            "selected_experts": chosen, "routed_experts": n_experts * len(layers),
            "selected_share": round(chosen / max(1, n_experts * len(layers)), 6)}


def union(a: Mapping[int, Sequence[int]], b: Mapping[int, Sequence[int]]) -> dict[int, tuple[int, ...]]:
    """Per-layer union of two selections (several ESFT stages train the union)."""
    return {i: tuple(sorted(set(a.get(i, ())) | set(b.get(i, ())))) for i in sorted(set(a) | set(b))}


# --- training -----------------------------------------------------------------------------------


def expert_parameters(model, spec: ArchSpec, selection: Mapping[int, Sequence[int]], lora: bool = False
                      ) -> list[tuple[str, nn.Parameter, torch.Tensor, int]]:
    """What ESFT trains: ``(name, parameter, expert index, expert dim)`` for each selected layer.

    Full weights: the fused ``gate_up_proj``/``down_proj`` (expert dim 0). With ``lora``: PEFT's factors
    of those parameters, ``lora_A`` [E*r, in] (expert-major, dim 0) and ``lora_B`` [out, r*E] (expert-minor,
    the last dim); the model must already carry LoRA on its routed experts.
    """
    out = []
    for i, (path, core, _) in moe_layers(model, spec).items():
        if not selection.get(i):
            continue
        idx = torch.tensor(sorted(selection[i]), dtype=torch.long)
        if not lora:
            for pname in EXPERT_PARAMS:
                out.append((f"{path}.{pname}", getattr(core, pname), idx, 0))
            continue
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        wrappers = _wrappers(base.get_submodule(path))
        if set(wrappers) != set(EXPERT_PARAMS):
            raise UsageError(f"layer {i}: ESFT with lora needs LoRA on {', '.join(EXPERT_PARAMS)} of the routed experts")
        for pname in EXPERT_PARAMS:
            w = wrappers[pname]
            out.append((f"{path}.{pname}.lora_A", w.lora_A["default"].weight, idx, 0))
            out.append((f"{path}.{pname}.lora_B", w.lora_B["default"].weight, idx, -1))
    return out


def _expert_view(t: torch.Tensor, n_experts: int, dim: int) -> torch.Tensor:
    """``t`` with its expert dimension split out: dim 0 -> [E, ...]; dim -1 (expert-minor) -> [..., E]."""
    return t.view(n_experts, -1, *t.shape[1:]) if dim == 0 else t.view(*t.shape[:-1], -1, n_experts)


def expert_mask(t: torch.Tensor, n_experts: int, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """A 0/1 tensor shaped like ``t``, 1 on the slices of the experts ``idx`` along the expert dimension."""
    view = _expert_view(torch.zeros_like(t), n_experts, dim)
    if dim == 0:
        view[idx.to(t.device)] = 1
    else:
        view[..., idx.to(t.device)] = 1
    return view.reshape(t.shape)


@contextmanager
def expert_grad_mask(params: Sequence[tuple[str, nn.Parameter, torch.Tensor, int]], n_experts: int) -> Iterator[None]:
    """While active, the gradients of ``params`` (from :func:`expert_parameters`) are zero outside the
    selected experts, so AdamW (with weight decay 0) leaves those slices bit-identical.

    The hook fills the other experts' slices with zeros out of place: no mask the size of the fused
    weight is kept (on DeepSeek-V2-Lite that would be another 27 GiB).
    """
    def zero_others(g: torch.Tensor, others: torch.Tensor, dim: int) -> torch.Tensor:
        view = _expert_view(g, n_experts, dim)
        return view.index_fill(0 if dim == 0 else view.dim() - 1, others.to(g.device), 0).reshape(g.shape)

    handles = []
    for _, p, idx, dim in params:
        others = torch.tensor(sorted(set(range(n_experts)) - set(idx.tolist())), dtype=torch.long)
        handles.append(p.register_hook(lambda g, o=others, d=dim: zero_others(g, o, d)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def mask_expert_grad_(p: nn.Parameter, n_experts: int, idx: torch.Tensor, dim: int) -> None:
    """Zero ``p.grad`` outside the experts ``idx`` in place, as :func:`expert_grad_mask` does, for FSDP2:
    its shards get their gradients assigned (no tensor hook runs) and hold only some rows, so the mask is
    built for the rows this rank holds (:func:`dsft.base.sharding.local_offset`)."""
    if p.grad is None:
        return
    from dsft.base.sharding import local_offset

    g, offset = local_offset(p.grad)
    idx = idx.to(g.device)
    if dim == 0:  # expert-major rows: row r belongs to expert r // (rows per expert)
        experts = torch.arange(offset, offset + g.shape[0], device=g.device) // (p.shape[0] // n_experts)
        g.mul_(torch.isin(experts, idx).to(g.dtype).view(-1, *([1] * (g.dim() - 1))))
    else:  # expert-minor last dim: column c belongs to expert c % E
        g.mul_(torch.isin(torch.arange(g.shape[-1], device=g.device) % n_experts, idx).to(g.dtype))


def select_slices(t: torch.Tensor, n_experts: int, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """The selected experts' part of ``t`` (a parameter or an optimizer state shaped like it), in ``t``'s
    layout with ``len(idx)`` experts instead of ``n_experts``: W [E, o, i] -> [k, o, i]; A [E*r, i] -> [k*r, i];
    B [o, r*E] -> [o, r*k]."""
    view = _expert_view(t, n_experts, dim)
    if dim == 0:
        return view[idx].reshape(-1, *t.shape[1:]).contiguous()
    return view[..., idx].reshape(*t.shape[:-1], -1).contiguous()


def put_slices(t: torch.Tensor, n_experts: int, idx: torch.Tensor, dim: int, values: torch.Tensor) -> None:
    """Inverse of :func:`select_slices`, in place."""
    view = _expert_view(t, n_experts, dim)
    with torch.no_grad():
        if dim == 0:
            view[idx] = values.reshape(view[idx].shape).to(view.dtype)
        else:
            view[..., idx] = values.reshape(view[..., idx].shape).to(view.dtype)


# --- save / load --------------------------------------------------------------------------------


@dataclass
class EsftState:
    """The ESFT part of a run: what was selected on which scores (JSON-able except nothing)."""

    method: str
    p: float
    lora: bool
    selection: dict[int, tuple[int, ...]] = field(default_factory=dict)
    tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "p": self.p, "lora": self.lora, "tokens": self.tokens,
                "selection": {str(i): list(v) for i, v in sorted(self.selection.items())}}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> EsftState:
        return EsftState(d["method"], float(d["p"]), bool(d.get("lora", False)),
                         {int(i): tuple(v) for i, v in d["selection"].items()}, int(d.get("tokens", 0)))


@torch.no_grad()
def trained_slices(model, spec: ArchSpec, selection: Mapping[int, Sequence[int]]) -> dict[str, torch.Tensor]:
    """``{"<param>": W[idx], "<param>.experts": idx}`` of the selected experts, LoRA merged in when present."""
    out: dict[str, torch.Tensor] = {}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for i, (path, core, _) in moe_layers(model, spec).items():
        if not selection.get(i):
            continue
        idx = torch.tensor(sorted(selection[i]), dtype=torch.long)
        wrappers = _wrappers(base.get_submodule(path))
        for pname in EXPERT_PARAMS:
            weight = getattr(core, pname)
            n_experts, out_f, in_f = weight.shape
            w = weight[slot_index(core, idx).to(weight.device)].float()
            wrapper = wrappers.get(pname)
            if wrapper is not None and "default" in wrapper.lora_A:
                # PEFT's layout for a 3-D parameter: A [E*r, in] expert-major, B [out, r*E] expert-minor.
                A = wrapper.lora_A["default"].weight.float().view(n_experts, -1, in_f)[idx]
                B = wrapper.lora_B["default"].weight.float().view(out_f, -1, n_experts)[..., idx].permute(2, 0, 1)
                w = w + wrapper.scaling["default"] * (B @ A)
            out[f"{path}.{pname}"] = w.to(weight.dtype).cpu().contiguous()
            out[f"{path}.{pname}{INDEX_SUFFIX}"] = idx.clone()
    return out


def save_esft(path: Path, model, spec: ArchSpec, selection: Mapping[int, Sequence[int]]) -> dict[str, list[int]]:
    """Write the selected experts' slices to ``path`` (safetensors); returns the full shapes of the
    parameters they belong to (the manifest's ``target_shapes``)."""
    from safetensors.torch import save_file

    tensors = trained_slices(model, spec, selection)
    save_file(tensors, str(path), metadata={"format": "dsft-esft", "version": "1"})
    shapes = {}
    for _, (p, core, _) in moe_layers(model, spec).items():
        for pname in EXPERT_PARAMS:
            if f"{p}.{pname}" in tensors:
                shapes[f"{p}.{pname}"] = list(getattr(core, pname).shape)
    return shapes


@torch.no_grad()
def apply_slices(model, tensors: Mapping[str, torch.Tensor]) -> int:
    """Write saved expert slices into ``model``'s fused parameters in place; returns how many experts.

    Raises:
        IncompatibleError: a parameter is missing or its shape does not fit the slices.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = dict(base.named_parameters())
    n = 0
    for name, values in tensors.items():
        if name.endswith(INDEX_SUFFIX):
            continue
        idx = tensors[name + INDEX_SUFFIX].long()
        p = params.get(name)
        if p is None:
            raise IncompatibleError(f"ESFT adapter slices {name}, which this base does not have; use the base it was trained on")
        if tuple(values.shape[1:]) != tuple(p.shape[1:]) or int(idx.max()) >= p.shape[0] or len(idx) != values.shape[0]:
            raise IncompatibleError(f"ESFT adapter slices of {name} ({list(values.shape)}, experts {idx.tolist()}) do not fit "
                                    f"its shape {list(p.shape)} on this base")
        experts = base.get_submodule(name.rsplit(".", 1)[0])
        p[slot_index(experts, idx).to(p.device)] = values.to(p.device, p.dtype)
        n += len(idx) if name.endswith(EXPERT_PARAMS[0]) else 0
    return n


def load_esft(model, tokenizer, directory: str | Path, manifest: Manifest):
    """Put an ESFT adapter onto ``model`` (a plain transformers model) in place and return the model.

    Term rows (if any) extend the tokenizer and the embeddings as for LoRA adapters; the selected
    experts' slices replace the base's. The files must already be verified against the manifest.
    """
    from safetensors.torch import load_file

    from dsft.adapters.terms import TermPlan, extend_model, load_terms

    directory = Path(directory)
    if manifest.added_tokens:
        plan = TermPlan(manifest.added_tokens, int(manifest.term_start or 0), ())
        extend_model(model, tokenizer, plan, rows=load_terms(directory / TERMS_FILE))
    apply_slices(model, load_file(str(directory / ESFT_FILE)))
    return model
