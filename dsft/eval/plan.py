"""``dsft plan``: what a training run will cost in GPU memory and time, from the base's config alone.

No weights are read. The model is built on the *meta* device (shapes, no storage) to count its
parameters and the LoRA / ESFT parameters dsft would train, and one decoder layer of each kind
(dense, MoE) is run forward on meta tensors under ``saved_tensors_hooks``: the bytes autograd keeps
per token are then exactly those of the code that trains (MLA or GQA attention, router, the grouped
expert path, LoRA), not a formula that drifts from it.

Peak memory is modelled as the moment backward starts or the widest moment inside it::

    weights + trainable state (params, grads, AdamW moments)
      + kept activations      all layers' saved tensors, or with checkpointing only each layer's input
      + max(loss chunk,       one chunk of logits in bf16 and fp32, with their gradients
            one layer's backward)  with checkpointing: that layer recomputed, plus its gradients

Allocator overhead is not in that sum (it is what ``torch.cuda.max_memory_allocated`` measures); the
fit decision adds the CUDA context and a fragmentation margin (``OVERHEAD_*``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.base.loading import BaseRef
from dsft.errors import NotFoundError, show
from dsft.eval.plan_request import GIB, METHODS, PlanRequest  # noqa: F401 - METHODS re-exported: the planner's public names
from dsft.kernels.chunked_ce import chunk_positions

OVERHEAD_CONTEXT_GIB = 0.6
"""CUDA context + cuBLAS workspaces: outside ``max_memory_allocated``, inside the card's memory."""
OVERHEAD_FRAGMENTATION = 0.05
"""Share of the allocated peak the caching allocator typically holds on top, reserved but unused."""
COMPILED_KEPT_SHARE = 0.55
"""Share of a layer's counted activations (eager, on meta) planned for a layer that keeps them when layers compile
(dsft train on a GPU, under :data:`dsft.kernels.compile.KEPT_MEMORY_BUDGET`): fused pointwise work saves less
than eager autograd, and the budget a fifth less again. Measured on an H200, lite shape, 2026-12-02: 0.45 of the
count at 4 x 2048 (0.58 GiB a layer), and from the CLI at 5 x 6,144 20 and 27 layers kept peaked at 85.2 and 100.6
GiB: 2.19 GiB a layer of 4.88 counted, 0.45 again (``benchmarks/results/2026-12-02-h200-train-cli-auto.md``); 0.55
leaves a fifth on top, inside the plan's 10% margin.
Should a shape keep more, half the kept layers recompute again and the step runs again (each time it runs out of
memory), it does not fail."""
ATTENTION_RECOMPUTE_COST = 0.15
"""What recomputing a kept layer's attention inputs costs, as a share of what keeping that layer gains. Measured
on an H200, lite shape, 4 x 2048, compiled (2026-12-02, one process a run): 16 kept layers 25,474 tokens/s plain and
24,638 recomputing, one call (0.2% of the step a layer, ``benchmarks/results/2026-12-02-h200-attention-recompute.md``),
against ~1.3% a kept layer gains (one ``--all`` invocation: 16 kept 25,393, 27 kept 29,166)."""
BACKWARD_TRANSIENT = 0.5
"""Gradients alive inside one layer's backward, as a share of that layer's saved activations."""
NF4_BYTES = 0.5 + 4 / 64
"""4-bit weights plus one fp32 absmax per block of 64 (bitsandbytes NF4 without double quantisation)."""
H100_BF16_TFLOPS = 989.0
MEASURED_TFLOPS_H100 = 312.4
"""Useful TFLOP/s (by :func:`flops_per_token`) that dsft's fast path reached on one H100: DeepSeek-V2-Lite
shape, 4 x 2048, LoRA on attention + shared + routed experts (dsft train's default targets), checkpointing,
compiled, fused AdamW: 19,777 and 20,370 tokens/s in two invocations, 20,074 on average
(benchmarks/results/2026-11-25-NVIDIA-H100-80GB-HBM3-train-throughput.md). Other methods and GPUs are assumed to
reach the same share of their peak."""
DEQUANT_S_PER_PARAM_H100 = 4.2e-12
"""Seconds per quantised parameter and training step that QLoRA adds over LoRA's efficiency, on a card of the H100's
bf16 peak: lite shape, 1 x 2048, a step replayed as a CUDA graph (what dsft train runs on one GPU) took 0.166 s on
an H200 (12,305 tokens/s, benchmarks/results/2026-12-01-h200-train-graphs.md) where the same FLOPs at
:data:`MEASURED_TFLOPS_H100` take 0.102 s; over the 15.3 B quantised parameters. (Eager steps, bound by the host's
launches: 2.1e-11 from 0.417 s on an H100.)"""
FSDP2_EFFICIENCY = 37258.0 / 22814.3 / 2
"""Tokens/s of N GPUs under FSDP2 over N times one GPU's, at the same per-GPU batch: 1.633x on 2 H200 (lite shape,
8 x 2048 a GPU, compiled; benchmarks/results/2026-11-30-h200x2-multi-gpu.json). Assumed for more GPUs too."""
GPU_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0,
              "L4": 121.0, "A10": 125.0, "4090": 165.0, "B200": 2250.0}


@dataclass(frozen=True)
class ModelCounts:
    """What the plan needs of a model, counted on the meta device."""

    params: int
    expert_params: int
    """Routed experts' weights (all layers)."""
    linear_params: int
    """Weights of every matrix multiply outside the experts except embeddings and head (what QLoRA quantises)."""
    lora_params: int
    active_params: int
    """Parameters one token goes through (routed experts: top-k of them)."""
    hidden: int
    vocab: int
    layers: int
    saved_per_token: dict[str, float]
    """Saved activation bytes per token of one layer, by layer kind (``dense``/``moe``)."""
    saved_per_seq2: dict[str, float]
    """Saved bytes per squared sequence length of one layer (attention weights on the math path)."""
    layer_kinds: dict[str, int]
    largest_layer_params: int
    """Parameters of the largest decoder layer (what FSDP2 all-gathers whole while it runs)."""
    attention_flops_per_token_per_pos: float
    """Attention score + value FLOPs per token per position attended (forward)."""
    max_positions: int
    attention_inputs_per_token: float = 0.0
    """Bytes of the query, key and value one layer's attention kernel reads, per token (what a kept layer whose
    attention recomputes its inputs does not hold: :mod:`dsft.kernels.attention_recompute`)."""


@dataclass(frozen=True)
class MemoryEstimate:
    weights: float
    trainable: float
    gradients: float
    optimizer: float
    activations: float
    transient: float
    overhead: float

    @property
    def peak_allocated(self) -> float:
        """What ``torch.cuda.max_memory_allocated`` should show (bytes)."""
        return self.weights + self.trainable + self.gradients + self.optimizer + self.activations + self.transient

    @property
    def total(self) -> float:
        """What the card must hold (bytes)."""
        return self.peak_allocated + self.overhead


@dataclass(frozen=True)
class Plan:
    request: PlanRequest
    memory: MemoryEstimate
    tokens_per_s: float | None
    gpu_mem_gib: float
    fits: bool
    suggestion: tuple[int, int] | None
    """The largest (batch, seq) that fits, by tokens per step."""
    trainable_params: int
    notes: list[str] = field(default_factory=list)
    kept_layers: int = 0
    """Decoder layers ``dsft train --keep-layers auto`` would spare the recompute on this GPU (compiled, one process,
    not over a 4-bit base), out of :attr:`layers`; each holds :attr:`kept_layer_gib` more."""
    layers: int = 0
    kept_layer_gib: float = 0.0
    attention_recomputed: bool = False
    """The kept layers' attention recomputes its inputs in backward (:func:`keep_plan`)."""

    def to_json(self) -> dict[str, Any]:
        mem = {k: round(v / GIB, 3) for k, v in asdict(self.memory).items()}
        mem["peak_allocated"] = round(self.memory.peak_allocated / GIB, 3)
        mem["total"] = round(self.memory.total / GIB, 3)
        return {"request": asdict(self.request), "memory_gib": mem, "gpu_mem_gib": self.gpu_mem_gib, "fits": self.fits,
                "tokens_per_s": None if self.tokens_per_s is None else round(self.tokens_per_s),
                "suggestion": None if self.suggestion is None else {"batch": self.suggestion[0], "seq": self.suggestion[1]},
                "trainable_params": self.trainable_params, "notes": self.notes,
                "kept_layers": {"auto": self.kept_layers, "of": self.layers, "gib_each": round(self.kept_layer_gib, 3),
                                "attention_recomputed": self.attention_recomputed}}


# --- the model, on the meta device --------------------------------------------------------------------


def base_config(base: str | BaseRef):
    """The transformers config of ``base`` (a name, or one already resolved) without building a preset or reading weights."""
    from transformers import AutoConfig

    from dsft.base.presets import PRESETS, TOKENIZER_VOCAB
    from dsft.base.remote_code import refuse_remote_code

    if isinstance(base, BaseRef):  # resolved: read its directory, except a preset's config, which is built in memory
        base = base.name if base.source.startswith("preset:") else str(base.path)

    if base in PRESETS:
        return PRESETS[base].make_config(TOKENIZER_VOCAB)
    path = Path(base).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise NotFoundError(f"{base} is a directory but holds no config.json; point --base at a Hugging Face model directory")
        refuse_remote_code(path, False, base)  # plan never runs a model directory's code
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    try:
        return AutoConfig.from_pretrained(base, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError):  # not cached, not a repo id: one message for both
        raise NotFoundError(f"unknown base {show(base)}: not a preset ({', '.join(PRESETS)}), a model directory, or a hub id "
                            "in the local cache (huggingface-cli download it first)") from None


def _meta_model(config, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _saved_bytes(layer, rotary, hidden: int, dtype: torch.dtype, params: set[int]) -> tuple[float, float]:
    """Bytes autograd keeps for one layer's forward of one sequence of length S, as (per token, per S^2).

    The S^2 part is attention that materialises its weights (the math path of SDPA, which CPU training
    takes with MLA's unequal head sizes); CUDA's memory-efficient kernels keep nothing quadratic.
    """
    from dsft.kernels import expert_lora

    def run(seq: int) -> float:
        kept: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            owner = t._base if t._base is not None else t
            if id(owner) not in params:
                kept[id(owner)] = max(kept.get(id(owner), 0), owner.numel() * owner.element_size())
            return t

        x = torch.empty((1, seq, hidden), device="meta", dtype=dtype, requires_grad=True)
        pos = torch.arange(seq, device="meta")[None]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x, position_embeddings=rotary(x, pos), attention_mask=None)
        return float(sum(kept.values()))  # the layer's input is among them (its first norm keeps it)

    with expert_lora.grouped_kernel_forced():  # the shape-static grouped path (the loop needs real routing)
        a, b, c = run(128), run(256), run(512)
    # saved(S) = k0 + k1 S + k2 S^2 through three points.
    k2 = ((c - b) / 256 - (b - a) / 128) / (512 - 128)
    k1 = (b - a) / 128 - k2 * (256 + 128)
    return k1, max(k2, 0.0)


def count_model(base: str | BaseRef, *, lora_r: int = 16, dtype: torch.dtype = torch.bfloat16) -> ModelCounts:
    """Parameter counts and per-token saved activations of ``base`` with dsft's LoRA attached (meta device)."""
    from dsft.adapters.lora import LoraSettings, attach_lora
    from dsft.base.arch import spec_for, top_k

    config = base_config(base)
    spec = spec_for(getattr(config, "model_type", None), getattr(config, "architectures", None))
    model = _meta_model(config, dtype)
    decoder = model.get_decoder()
    embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    params = sum(p.numel() for p in model.parameters())
    expert_params, linear_params, kinds, active = 0, 0, {}, 0
    largest = max(sum(p.numel() for p in layer.parameters()) for layer in decoder.layers)
    k = top_k(spec, config)
    for layer in decoder.layers:
        try:
            experts = layer.get_submodule(spec.experts_attr)
            n_e = experts.gate_up_proj.shape[0]
            e_params = sum(p.numel() for p in experts.parameters())
            expert_params += e_params
            active += e_params * k // n_e
            kinds["moe"] = kinds.get("moe", 0) + 1
        except AttributeError:
            e_params = 0
            kinds["dense"] = kinds.get("dense", 0) + 1
        rest = sum(p.numel() for n, p in layer.named_parameters() if p.dim() >= 2) - e_params
        linear_params += rest
        active += sum(p.numel() for p in layer.parameters()) - e_params
    model = attach_lora(model, spec, LoraSettings(r=lora_r, alpha=2 * lora_r))
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    base_model = model.get_base_model()
    layers = base_model.get_decoder().layers
    rotary = base_model.get_decoder().rotary_emb
    param_ids = {id(p) for p in model.parameters()}
    saved, saved2 = {}, {}
    for kind in kinds:
        index = next(i for i, layer in enumerate(layers) if _has(layer, spec.experts_attr) == (kind == "moe"))
        saved[kind], saved2[kind] = _saved_bytes(layers[index], rotary, config.hidden_size, dtype, param_ids)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads  # Qwen3-MoE sets its own
    qk = getattr(config, "qk_nope_head_dim", 0) + getattr(config, "qk_rope_head_dim", 0) or head_dim
    v = getattr(config, "v_head_dim", None) or head_dim
    kv_heads = getattr(config, "num_key_value_heads", None) or heads  # MLA: keys and values expanded to every head
    return ModelCounts(
        params=params, expert_params=expert_params, linear_params=linear_params, lora_params=lora_params,
        active_params=active + head.numel(), hidden=config.hidden_size, vocab=embed.shape[0], layers=len(layers),
        saved_per_token=saved, saved_per_seq2=saved2, layer_kinds=kinds, largest_layer_params=largest, attention_flops_per_token_per_pos=2.0 * heads * (qk + v),
        max_positions=int(getattr(config, "max_position_embeddings", 4096) or 4096),
        attention_inputs_per_token=float((heads * qk + kv_heads * (qk + v)) * dtype.itemsize),
    )


def _has(layer, attr: str) -> bool:
    try:
        layer.get_submodule(attr)
        return True
    except AttributeError:
        return False


# --- the estimate -----------------------------------------------------------------------------------


def estimate_memory(c: ModelCounts, req: PlanRequest) -> tuple[MemoryEstimate, int, list[str]]:
    """(memory, trainable parameter count, notes) for ``req`` on the model counted in ``c``."""
    wbytes = 2 if req.device == "cuda" else 4
    notes: list[str] = []
    tokens = req.batch * req.seq
    terms = 2 * req.new_terms * c.hidden  # embedding + head rows of the new terms (fp32)
    weights = c.params * wbytes
    if req.method == "qlora":
        weights -= (c.linear_params + c.expert_params) * (wbytes - NF4_BYTES)
        notes.append("qlora: attention, dense and expert weights in NF4 (bitsandbytes), the rest in bf16")
    if req.method in ("lora", "qlora"):
        trainable = c.lora_params + req.new_terms * c.hidden * 2
        state = {"trainable": trainable * 4.0, "gradients": trainable * 4.0, "optimizer": trainable * 8.0}
    elif req.method == "esft":
        chosen = int(c.expert_params * req.esft_share)
        trainable = chosen + req.new_terms * c.hidden * 2
        # The selected experts train as parameters of their own (dsft.adapters.esft_slices): gradients and
        # AdamW's two moments exist for them only, in the weights' dtype.
        state = {"trainable": terms * 4.0, "gradients": chosen * wbytes + terms * 4.0, "optimizer": chosen * wbytes * 2 + terms * 8.0}
        notes.append(f"esft: {req.esft_share:.1%} of routed experts train; gradients and AdamW state for those only")
    else:
        trainable = c.params
        state = {"trainable": 0.0, "gradients": c.params * wbytes, "optimizer": c.params * wbytes * 2.0}
        notes.append("full: every weight trains; AdamW moments in the weights' dtype (no fp32 master copy)")
    if req.optimizer == "adamw8bit":  # bitsandbytes: each moment one byte a value (+ a scale per 256, ~1.6%)
        state["optimizer"] = trainable * 2.0 * (1 + 4 / 256)
        notes.append("adamw8bit: AdamW's moments in 8 bits (bitsandbytes), 2 bytes a trained value")
    quadratic = 0.0 if req.device == "cuda" else 1.0
    layer_saved = {k: v * tokens + quadratic * c.saved_per_seq2[k] * req.batch * req.seq**2
                   for k, v in c.saved_per_token.items()}
    widest = max(layer_saved.values())
    layer_input = tokens * c.hidden * wbytes
    if req.checkpointing:
        kept = c.layers * layer_input
        inside = widest * (1 + BACKWARD_TRANSIENT)
    else:
        kept = sum(layer_saved[k] * n for k, n in c.layer_kinds.items())
        inside = widest * BACKWARD_TRANSIENT
    if req.method == "qlora":
        # One layer's frozen weights dequantised to bf16 while it runs (and, recomputed, while its backward runs).
        inside += (c.expert_params / max(1, c.layer_kinds.get("moe", 0)) + c.linear_params / c.layers) * wbytes
    kept += 2 * layer_input  # the final norm's input and output, which the chunked head reads
    chunk = min(chunk_positions(c.vocab), tokens)
    # Logits and their gradient in the weights' dtype, their fp32 copies (the same tensors on CPU), and
    # the saved log-softmax.
    loss = chunk * c.vocab * (2 * wbytes + 8 if wbytes != 4 else 12)
    transient = max(loss, inside) + 2 * layer_input  # + the gradient flowing between layers
    if req.num_gpus > 1:
        # FSDP2: each GPU holds 1/N of the weights and of the trainable state, plus the layer it has all-gathered
        # whole to run. One such layer at the peak matched the 2 x H200 runs (lite shape, 4 and 8 x 2048 a GPU:
        # 21.81 and 23.47 GiB measured; tests/eval/test_plan.py).
        weights = weights / req.num_gpus + c.largest_layer_params * wbytes
        state = {k: v / req.num_gpus for k, v in state.items()}
        notes.append(f"fsdp2 over {req.num_gpus} GPUs: weights and trainable state sharded, one layer gathered at a time; "
                     f"--batch is each GPU's rows")
    # On one CUDA device dsft train's AdamW is torch's fused one: no step-time copies of the moments
    # (foreach, used under FSDP2 and on CPU, takes the square root of all second moments at once).
    overhead = 0.0
    if req.device == "cuda":
        peak = weights + sum(state.values()) + kept + transient
        overhead = OVERHEAD_CONTEXT_GIB * GIB + OVERHEAD_FRAGMENTATION * peak
    return MemoryEstimate(weights, state["trainable"], state["gradients"], state["optimizer"], kept, transient,
                          overhead), trainable, notes


def layers_to_keep(c: ModelCounts, req: PlanRequest, gpu_bytes: float, margin: float = 0.10, compiled: bool = False,
                   attention_recomputed: bool = False) -> int:
    """How many decoder layers can skip activation checkpointing (keep their activations, no recompute)
    when ``req`` (with checkpointing) trains on a card of ``gpu_bytes``, leaving ``margin`` of it unplanned.

    Each kept layer holds its saved activations instead of only its input (the widest layer kind's, so
    any layer may be the one kept); ``compiled`` (dsft train's default on a GPU): :data:`COMPILED_KEPT_SHARE` of them;
    ``attention_recomputed``: less its attention's inputs (:func:`kept_layer_bytes`).
    """
    if not req.checkpointing or req.device != "cuda":
        return 0
    per_layer = kept_layer_bytes(c, req, compiled, attention_recomputed)
    room = gpu_bytes * (1 - margin) - estimate_memory(c, req)[0].total
    if per_layer <= 0 or room <= 0:
        return 0
    return int(min(c.layers, room // per_layer))


def kept_layer_bytes(c: ModelCounts, req: PlanRequest, compiled: bool = False, attention_recomputed: bool = False) -> float:
    """What one layer that keeps its activations holds on top of its checkpointed input, at ``req``'s micro-batch;
    ``attention_recomputed``: without its attention kernel's query, key and value (recomputed in backward). That
    is less than such a layer frees (the projections' own saved tensors go too): measured 0.18 GiB a layer at
    4 x 2048 on the lite shape, 0.12 counted here."""
    tokens = req.batch * req.seq
    per_layer = (max(c.saved_per_token.values()) * tokens - tokens * c.hidden * 2) * (COMPILED_KEPT_SHARE if compiled else 1.0)
    return per_layer - (c.attention_inputs_per_token * tokens if attention_recomputed else 0.0)


def keep_plan(c: ModelCounts, req: PlanRequest, gpu_bytes: float, compiled: bool = True) -> tuple[int, bool]:
    """``--keep-layers auto``: (layers kept, whether their attention recomputes its inputs). Every layer keeps
    plainly where all fit; otherwise recomputing attention's inputs is chosen when the extra layers it makes room
    for win back more than it costs each kept layer (:data:`ATTENTION_RECOMPUTE_COST`)."""
    plain = layers_to_keep(c, req, gpu_bytes, compiled=compiled)
    if plain == c.layers:
        return plain, False
    lean = layers_to_keep(c, req, gpu_bytes, compiled=compiled, attention_recomputed=True)
    return (lean, True) if lean * (1 - ATTENTION_RECOMPUTE_COST) > plain else (plain, False)


def flops_per_token(c: ModelCounts, req: PlanRequest) -> float:
    """Training FLOPs per token: forward 2N, backward 2N for the inputs (+2N weight gradients when the
    base trains), +2N for recomputation with checkpointing, plus causal attention."""
    n = c.active_params
    passes = 2 + 2 + (2 if req.method == "full" else 0) + (2 if req.checkpointing else 0)
    attention = c.attention_flops_per_token_per_pos * req.seq / 2 * c.layers * (passes / 2)
    return n * passes + attention


def gpu_tflops(name: str | None) -> float | None:
    if not name:
        return None
    return next((t for key, t in GPU_TFLOPS.items() if key in name), None)


def plan(req: PlanRequest, counts: ModelCounts | None = None, gpu_name: str | None = None) -> Plan:
    """Estimate ``req``; ``counts`` can be passed to plan several settings of one base cheaply.

    Raises:
        NotFoundError: unknown base.
        UsageError: a bad setting.
    """
    c = counts or count_model(req.base, lora_r=req.lora_r, dtype=torch.bfloat16 if req.device == "cuda" else torch.float32)
    if gpu_name is None and req.device == "cuda" and torch.cuda.is_available():
        gpu_name = torch.cuda.get_device_name()
    gpu_mem = req.gpu_mem_gib
    if gpu_mem is None:
        gpu_mem = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else 80.0
    mem, trainable, notes = estimate_memory(c, req)
    fits = mem.total <= gpu_mem * GIB
    peak = gpu_tflops(gpu_name) or H100_BF16_TFLOPS
    if gpu_name and gpu_tflops(gpu_name) is None:
        notes.append(f"unknown GPU {gpu_name!r}: tokens/s assumes an H100")
    tokens_per_s = None
    if req.device == "cuda":
        useful = MEASURED_TFLOPS_H100 * peak / H100_BF16_TFLOPS * 1e12
        tokens = req.batch * req.seq
        step_s = tokens * flops_per_token(c, req) / useful
        if req.method == "qlora":  # every quantised weight is dequantised in forward, recompute and backward
            step_s += (c.linear_params + c.expert_params) * DEQUANT_S_PER_PARAM_H100 * H100_BF16_TFLOPS / peak
        tokens_per_s = tokens / step_s
        if req.num_gpus > 1:
            tokens_per_s *= req.num_gpus * FSDP2_EFFICIENCY
    best = None
    for seq in _powers(64, min(c.max_positions, 1 << 17)):
        for batch in _powers(1, 1024):
            r = PlanRequest(**{**asdict(req), "seq": seq, "batch": batch, "gpu_mem_gib": gpu_mem})
            if estimate_memory(c, r)[0].total > gpu_mem * GIB:
                break
            if best is None or batch * seq > best[0] * best[1] or (batch * seq == best[0] * best[1] and seq > best[1]):
                best = (batch, seq)
    kept, lean = 0, False
    if fits and req.num_gpus == 1 and req.method != "qlora":  # as dsft train's --keep-layers auto (card_fit)
        kept, lean = keep_plan(c, req, gpu_mem * GIB)
    return Plan(req, mem, tokens_per_s, round(gpu_mem, 2), fits, best, trainable, notes, kept, c.layers,
                kept_layer_bytes(c, req, compiled=True, attention_recomputed=lean) / GIB, lean)


def _powers(start: int, stop: int) -> list[int]:
    out = []
    while start <= stop:
        out.append(start)
        start *= 2
    return out
