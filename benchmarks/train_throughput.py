"""Training throughput of MoE LoRA on a DeepSeek-V2-Lite-shaped model (random weights, bf16), one variant per process.

    python benchmarks/train_throughput.py --all [--layers 27] [--bs 4] [--seq 2048]    # every variant, JSON + markdown
    python benchmarks/train_throughput.py --variant dsft_lora --compile               # one variant, one JSON line

Variants (all: gradient checkpointing, LoRA r16 alpha 32, torch's fused AdamW - what dsft train uses on one GPU -,
batch x seq tokens per step):
  peft_experts      PEFT LoRA on attention + routed experts (target_parameters), experts grouped_mm  (the baseline)
  peft_attn         PEFT LoRA on attention only
  frozen            nothing trainable, input gradients only (the ceiling)
  dsft_lora         dsft: LoRA on attention + shared + routed experts, expert LoRA on routed tokens (grouped GEMMs)
                    (dsft train's default targets)
  dsft_lora_attn_experts  dsft_lora on PEFT's baseline targets: attention + routed experts (no shared experts)
  dsft_lora_grouped dsft_lora with all four expert-LoRA products as grouped GEMMs on the routed pairs
  dsft_frozen       nothing trainable, but the routed experts through dsft's grouped path (vs frozen: transformers')
  dsft_esft         dsft: ESFT-Token (p = 0.2, scored on random tokens) - the selected experts' full weights train
  dsft_qlora        dsft: dsft_lora on a base held in NF4 (bitsandbytes), run at --qlora-bs (default 1) x seq
Each variant with --compile compiles every decoder layer. --all also runs dsft_lora, dsft_esft and dsft_qlora as
dsft train steps them on one GPU (--compile --packed --attn dsft_varlen --graphs; flex_attention for grouped-query models).

    python benchmarks/train_throughput.py --variant dsft_qlora --compile --bs 1 --packed --attn dsft_varlen --graphs
                                                      # as dsft train steps: packed rows, varlen attention, CUDA graphs
    python benchmarks/train_throughput.py --variant dsft_lora --compile --packed --attn dsft_varlen --graphs --profile
                                                      # + where one step's time goes (kernels, idle GPU, optimizer, host)
    python benchmarks/train_throughput.py --longest                                    # longest seq at batch 1, PEFT vs dsft
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
MEASURED_TFLOPS = 776.0  # the best dense bf16 matmul measured on that card (../shared/bench/gpu_ceiling.py: 706-776)
_KEEP = []  # contexts that must stay open for the whole run (ESFT's trainable slices)


def lite_config(layers: int):
    from dsft.base.presets import PRESETS

    cfg = PRESETS["deepseek-v2-lite-shape"].make_config(102400)
    cfg.num_hidden_layers = layers
    return cfg


def build_model(layers: int, experts_impl: str = "grouped_mm"):
    """The model as the shared PEFT baseline script builds it: meta init, then random bf16 weights on the GPU."""
    from transformers import DeepseekV2ForCausalLM

    torch.manual_seed(0)
    cfg = lite_config(layers)
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(cfg)
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.fill_(1.0) if "norm" in n else p.normal_(0, 0.02)
    model.set_experts_implementation(experts_impl)
    for m in model.modules():  # rotary buffers were on meta; rebuild them (newer transformers drop rope_init_fn)
        if hasattr(m, "inv_freq"):
            fresh = type(m)(m.config, device=torch.device("cuda"))
            m.inv_freq, m.original_inv_freq, m.attention_scaling = fresh.inv_freq, fresh.original_inv_freq, fresh.attention_scaling
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def release() -> None:
    """Leave the contexts :func:`prepare` opened (ESFT's slices go back into the fused weights) while the
    interpreter is whole: a generator finalised at shutdown runs its cleanup with modules half torn down."""
    while _KEEP:
        _KEEP.pop().__exit__(None, None, None)


def cfg_dense(model) -> int:
    return model.config.first_k_dense_replace


def flops_per_token(cfg, seq: int) -> float:
    """Model FLOPs per trained token (forward + recompute + input-gradient backward; frozen weights)."""
    h, L, nh = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads
    attn = h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * nh * (cfg.qk_nope_head_dim + cfg.v_head_dim) \
        + h * nh * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) + nh * cfg.v_head_dim * h
    moe = 3 * h * cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    dense = 3 * h * cfg.intermediate_size
    active = L * attn + (L - cfg.first_k_dense_replace) * moe + cfg.first_k_dense_replace * dense + h * cfg.vocab_size
    scores = L * 2 * 2 * seq / 2 * nh * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    return 3 * (2 * active + scores)


def prepare(variant: str, layers: int, rank: int, dense_fold: bool = False):
    """(model, its decoder layers, the tensors to train) for one variant. ``dense_fold``: the dsft LoRA
    variants also fold attention and shared-expert LoRA A under their weights (``fold_lora(dense=True)``)."""
    from peft import LoraConfig, get_peft_model

    from dsft.adapters.lora import LoraSettings, attach_lora
    from dsft.base.arch import ARCHITECTURES

    spec = ARCHITECTURES["deepseek_v2"]
    model = build_model(layers)
    attn = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]

    def trainable(m):
        return [p for p in m.parameters() if p.requires_grad]

    if variant in ("frozen", "dsft_frozen"):
        if variant == "dsft_frozen":
            import types

            from dsft.kernels.expert_lora import experts_forward

            def forward(self, h, idx, w):
                return experts_forward(h, idx, w, self.gate_up_proj, self.down_proj, self.act_fn)

            for layer in model.model.layers[cfg_dense(model):]:
                layer.mlp.experts.forward = types.MethodType(forward, layer.mlp.experts)
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
        return model, model.model.layers, []
    if variant in ("peft_experts", "peft_attn"):
        kw = dict(r=rank, lora_alpha=2 * rank, target_modules=attn, lora_dropout=0.0)
        if variant == "peft_experts":
            kw["target_parameters"] = ["experts.gate_up_proj", "experts.down_proj"]
        model = get_peft_model(model, LoraConfig(**kw))
        return model, model.base_model.model.model.layers, trainable(model)
    if variant in ("dsft_lora", "dsft_qlora", "dsft_lora_grouped", "dsft_lora_attn_experts"):
        if variant == "dsft_lora_grouped":
            from dsft.kernels import expert_lora

            expert_lora.TOKEN_SIDE_LORA = False
        targets = ("attention", "routed_experts") if variant == "dsft_lora_attn_experts" else LoraSettings.targets
        model = attach_lora(model, spec, LoraSettings(r=rank, alpha=2 * rank, targets=targets))
        if variant == "dsft_qlora":
            from dsft.adapters.qlora import quantize_base

            quantize_base(model, spec)
            torch.cuda.empty_cache()
        elif variant != "dsft_lora_grouped":  # as dsft train does on one GPU
            from dsft.adapters.fast_lora import fold_lora

            fold_lora(model, dense=dense_fold)
        model.enable_input_require_grads()
        return model, model.base_model.model.model.layers, trainable(model)
    if variant == "dsft_esft":
        from dsft.adapters.esft import score_experts, select_layers
        from dsft.adapters.esft_slices import trainable_slices
        from dsft.data.tokenize import Examples

        ids = torch.randint(0, 102400, (8, 1024), generator=torch.Generator().manual_seed(1))
        scores = score_experts(model, spec, Examples(ids, ids, torch.ones_like(ids)), batch_size=4)
        selection = select_layers(scores.of("token"), 0.2)
        model.train()  # scoring left it in eval mode, where checkpointing is off
        for p in model.parameters():
            p.requires_grad_(False)
        ctx = trainable_slices(model, spec, selection)
        slices = ctx.__enter__()
        _KEEP.append(ctx)
        model.enable_input_require_grads()
        share = sum(len(v) for v in selection.values()) / (64 * len(selection))
        print(json.dumps({"esft_selected_share": round(share, 3)}), file=sys.stderr)
        return model, model.model.layers, [s.param for s in slices]
    raise SystemExit(f"unknown variant {variant}")


def packed_batch(rows: int, seq: int) -> dict[str, torch.Tensor]:
    """``rows`` packed rows of examples with benchmarks/real_data.py's lengths (response lognormal, median 300
    tokens, tail cut at 4,096; prompt a quarter of it, unlabelled), laid out by dsft's own packer."""
    import math
    import random

    from dsft.data.packing import best_fit, pack_rows

    rng = random.Random(0)
    examples = []
    while sum(len(x) for x, _ in examples) < 2 * rows * seq:
        response = min(4096, max(4, int(rng.lognormvariate(math.log(300), 0.9))))
        prompt = max(4, response // 4)
        ids = torch.randint(0, 102400, (prompt + response,))
        examples.append((ids, torch.cat([torch.full((prompt,), -100), ids[prompt:]])))
    layout = best_fit([min(len(x), seq) for x, _ in examples], seq)[:rows]
    batch = pack_rows(lambda i: (examples[i][0][:seq], examples[i][1][:seq]), layout, seq, pad_id=0)
    print(json.dumps({"packed_rows": rows, "examples": sum(map(len, layout)),
                      "padding": round(1 - batch["attention_mask"].float().mean().item(), 4)}))
    return {k: v.cuda() for k, v in batch.items()}


def with_seq_lens(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` as dsft train lays rows out for variable-length attention: the examples' lengths from the host
    (unpacked rows: one example a row)."""
    from dsft.data.packing import row_lengths

    rows, seq = batch["input_ids"].shape
    positions = batch.get("position_ids", torch.arange(seq, device="cuda").expand(rows, -1))
    return {**batch, "position_ids": positions, "seq_lens": row_lengths(positions.cpu()).cuda()}


def compile_layers(layers, mode: str | None = None, inductor: list[str] | None = None, functorch: list[str] | None = None) -> None:
    """``torch.compile`` every decoder layer, as ``dsft train`` does on a GPU. ``mode``, ``inductor`` and ``functorch``
    (``KEY=VALUE`` settings of ``torch._inductor.config`` / ``torch._functorch.config``, e.g. ``combo_kernels=True``,
    ``activation_memory_budget=0.7``) are for experiments."""
    import ast

    import torch._dynamo as dynamo
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    dynamo.config.cache_size_limit = 128  # one graph per layer, never an eager fallback
    dynamo.config.accumulated_cache_size_limit = 1024
    for config, items in ((inductor_config, inductor), (functorch_config, functorch)):
        for item in items or []:
            key, _, value = item.partition("=")
            setattr(config, key, ast.literal_eval(value) if value[:1] not in "abcdefghijklmnopqrstuvwxyz" else value)
    if any(item.startswith("activation_memory_budget=") for item in functorch or []):
        from dsft.kernels.flops import register_flop_formulas  # as dsft train does under a budget

        register_flop_formulas()
    for layer in layers:
        layer.compile(mode=mode)


def run_one(a) -> dict:
    from dsft.eval.losses import causal_lm_loss, lm_loss

    model, layers, trainable = prepare(a.variant, a.layers, a.rank, a.dense_fold)
    if a.keep_layers == "auto":  # what dsft train's default picks for this step on this card
        from dsft.eval.plan import PlanRequest, count_model, keep_plan

        method = {"dsft_esft": "esft", "dsft_qlora": "qlora"}.get(a.variant, "lora")
        req = PlanRequest(base="deepseek-v2-lite-shape", method=method, batch=a.bs, seq=a.seq, lora_r=a.rank, new_terms=0)
        a.keep_layers, lean = (0, False) if method == "qlora" else keep_plan(  # dsft train keeps none over a 4-bit base
            count_model("deepseek-v2-lite-shape", lora_r=a.rank), req, torch.cuda.get_device_properties(0).total_memory,
            compiled=a.compile)
        a.recompute_attention_inputs = a.recompute_attention_inputs or lean
    a.keep_layers = int(a.keep_layers)
    if a.compile and a.keep_layers and not any(f.startswith("activation_memory_budget=") for f in a.functorch or []):
        from dsft.kernels.compile import KEPT_MEMORY_BUDGET  # as dsft train compiles layers that keep activations

        a.functorch = [*(a.functorch or []), f"activation_memory_budget={KEPT_MEMORY_BUDGET}"]
    from dsft.kernels.attention_recompute import recompute_attention_inputs

    for layer in list(layers)[len(layers) - a.keep_layers:] if a.keep_layers else []:
        layer.gradient_checkpointing = False  # these layers keep their activations instead of recomputing them
        if a.recompute_attention_inputs:  # their attention's q / k / v recomputed, the kernel's outputs kept
            recompute_attention_inputs(layer)
    if a.compile:
        compile_layers(layers, a.compile_mode, a.inductor, a.functorch)
    opt = _optimizer(trainable, a.optimizer) if trainable else None
    x = torch.randint(0, 102400, (a.bs, a.seq), device="cuda")
    varlen = a.attn == "dsft_varlen"
    if varlen:
        from dsft.kernels.varlen import register

        register()
    if a.attn:
        (model.get_base_model() if hasattr(model, "get_base_model") else model).set_attn_implementation(a.attn)
    batch = packed_batch(a.bs, a.seq) if a.packed else {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}
    if varlen:
        batch = with_seq_lens(batch)
    tokens = int(batch["attention_mask"].sum())

    def forward_backward(part, weight, aux_share):
        # dsft trains with its chunked loss; the PEFT variants get what a PEFT user gets: full logits.
        if a.variant.startswith("dsft"):
            loss = lm_loss(model, part)
        else:
            loss = causal_lm_loss(model(input_ids=part["input_ids"], use_cache=False).logits, part["labels"])
        (loss * weight).backward()
        return loss.detach(), None, loss.detach()

    graphs = None
    if a.graphs:  # the training loop's CUDA graphs (dsft/recipes/graphs.py), as dsft train runs them on one GPU
        from dsft.recipes.graphs import StepGraphs, no_mask_built, recorded_alike

        graphs = StepGraphs(alike=no_mask_built if varlen else recorded_alike).bind(forward_backward, trainable)
    run = graphs or forward_backward

    def step():
        if graphs:
            graphs.step_begins()
        loss = run(batch, 1.0, 1.0)[0]
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=graphs is None)
        return loss

    torch.cuda.reset_peak_memory_stats()
    if a.memory_at_peak:  # the allocator's history over the warm-ups, where the peak is (with graphs, the capture)
        torch.cuda.memory._record_memory_history(max_entries=4_000_000, stacks="python")
        baseline = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    # Recording the history, torch 2.11 fails in a checkpoint's recompute that stops early (pytorch#179536):
    # recomputes run whole while it records (the forward's peak is the same).
    from torch.utils.checkpoint import set_checkpoint_early_stop

    early_stop = set_checkpoint_early_stop(False) if a.memory_at_peak else contextlib.nullcontext()
    with early_stop:
        for _ in range(3 if graphs else 2):  # with graphs: two warm-ups, then the capture, all untimed
            step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    if a.memory_at_peak:
        from dsft.eval.memory_peak import at_peak

        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
        torch.cuda.memory._record_memory_history(enabled=None)
        where = at_peak(trace, baseline, a.memory_at_peak).to_json()
        where["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)  # should match peak_gib
        print(json.dumps({"memory_at_peak": where}), file=sys.stderr, flush=True)
    if graphs is None:
        # Eager: the timed steps' own peak. With graphs a replay allocates nothing (its memory is the capture's pool,
        # taken in the warm-up), so the peak counts from the first warm-up: from the timed steps it read only what
        # stays allocated between steps (33.1 GiB for every --keep-layers count on 2026-12-02).
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    tps = tokens / dt
    fpt = flops_per_token(lite_config(a.layers), a.seq)
    profiled = profile_step(run, opt, batch, graphs is None, a.top) if a.profile else None
    tag = "".join(f"+{t}" for t in [a.compile_mode, *(a.inductor or []), *(a.functorch or [])] if t) if a.compile else ""
    tag += "+densefold" if a.dense_fold else ""
    tag += "+packed" if a.packed else ""
    tag += f"+{a.attn}" if a.attn else ""
    tag += "+graphs" if graphs else ""
    tag += f"+{a.optimizer}" if a.optimizer != "adamw" else ""
    tag += "+attn_inputs_recomputed" if a.recompute_attention_inputs else ""
    return dict(variant=a.variant + ("+compile" if a.compile else "") + tag + (f"+keep{a.keep_layers}" if a.keep_layers else ""),
                layers=a.layers, bs=a.bs, seq=a.seq,
                s_per_step=round(dt, 3), tokens_per_s=round(tps), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
                reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 1),
                trainable_m=round(sum(p.numel() for p in trainable) / 1e6, 1), tflops=round(tps * fpt / 1e12, 1),
                mfu_vs_989=round(tps * fpt / PEAK_TFLOPS / 1e12, 3), mfu_vs_measured=round(tps * fpt / MEASURED_TFLOPS / 1e12, 3),
                warmup_s=round(warm, 1), loss=round(loss.item(), 4),
                **({"graphs": graphs.summary()} if graphs else {}), **({"profile": profiled} if profiled else {}))


def profile_step(run, opt, batch, set_to_none: bool, top: int) -> dict:
    """Where one more step's time goes, the way the timed steps ran it: GPU time of the forward + backward (a graph
    replay with --graphs) and of the optimizer step (CUDA events), the sum of the kernels' own times in them
    (torch.profiler), the step's wall time; what the events measure beyond the kernels is idle GPU between
    kernels, what the wall time has beyond the events is the host."""
    from torch.profiler import ProfilerActivity, profile

    marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        marks[0].record()
        run(batch, 1.0, 1.0)
        marks[1].record()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=set_to_none)
        marks[2].record()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    return {"wall_ms": round(wall * 1e3, 1), "forward_backward_gpu_ms": round(marks[0].elapsed_time(marks[1]), 1),
            "optimizer_gpu_ms": round(marks[1].elapsed_time(marks[2]), 1),
            "kernel_ms": round(sum(e.device_time_total for e in events) / 1e3, 1), "kernels": sum(e.count for e in events),
            "top": [{"kernel": e.key[:100], "ms": round(e.device_time_total / 1e3, 2), "calls": e.count} for e in events[:top]]}


def _optimizer(trainable: list, kind: str) -> torch.optim.Optimizer:
    """torch's fused AdamW (what dsft train uses on one GPU; PEFT's baseline too), or ``adamw8bit``: bitsandbytes'
    8-bit AdamW as ``dsft train --optimizer adamw8bit`` builds it (same lr, betas and decay here)."""
    if kind == "adamw":
        return torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    from dsft.kernels.optim import build_adamw

    return build_adamw([{"params": trainable, "weight_decay": 0.01}], 1e-4, (0.9, 0.999), kind)


def run_longest(a) -> dict:
    """Batch 1, doubling the sequence from 8192 until a step runs out of memory (eager: one graph per length
    would be compiled otherwise). Returns the longest that trained and its peak."""
    from dsft.eval.losses import causal_lm_loss, lm_loss

    model, _, trainable = prepare(a.variant, a.layers, a.rank)
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    best, seq, tried = None, 8192, []
    while seq <= a.longest_max:
        x = torch.randint(0, 102400, (1, seq), device="cuda")
        torch.cuda.reset_peak_memory_stats()
        try:
            batch = {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}
            loss = lm_loss(model, batch) if a.variant.startswith("dsft") else causal_lm_loss(model(input_ids=x, use_cache=False).logits, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            best = {"seq": seq, "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
            tried.append({"seq": seq, "ok": True})
        except torch.OutOfMemoryError:
            tried.append({"seq": seq, "ok": False})
            break
        finally:
            loss = batch = None
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
        seq *= 2
    return {"variant": f"{a.variant} longest seq at batch 1", "longest_seq": best["seq"] if best else None,
            "peak_gib": best["peak_gib"] if best else None, "tried": tried}


PLAN = [("peft_experts", False), ("peft_attn", True), ("frozen", True), ("dsft_lora", True), ("dsft_lora", True, 3),
        ("dsft_lora_attn_experts", True), ("dsft_lora_attn_experts", True, 3),
        ("dsft_lora_grouped", True), ("dsft_esft", True),
        ("dsft_qlora", True), ("dsft_lora", "train"), ("dsft_lora", "train", 22, True), ("dsft_lora", "train", "auto"),
        ("dsft_esft", "train"), ("dsft_esft", "train", "auto"),
        ("dsft_qlora", "train"),
        ("peft_experts", "longest"), ("dsft_lora", "longest")]
"""(variant, mode[, layers kept out of checkpointing, or "auto": dsft train's default[, their attention's inputs
recomputed]]); 22 with attention recomputed: the most that stay under PEFT's peak on an H200 at 4 x 2048 (43.3 GiB,
2026-12-02; 16 plainly). mode: False eager, True
compiled, "train" as dsft train steps (compiled, packed SFT-like rows, variable-length attention, CUDA graphs),
"longest" the longest batch-1 sequence."""
TRAIN_FLAGS = ["--compile", "--packed", "--attn", "dsft_varlen", "--graphs"]


def _name(variant: str, mode, keep: int | str = 0, lean: bool = False) -> str:
    if mode == "longest":
        return f"{variant} longest seq at batch 1"
    kept = ("+attn_inputs_recomputed" if lean else "") + (f"+keep{keep}" if keep else "")
    if mode == "train":
        return variant + "+compile+packed+dsft_varlen+graphs" + kept
    return variant + ("+compile" if mode else "") + kept


def run_all(a) -> None:
    plan = PLAN if not a.only else [p for p in PLAN if _name(*p) in a.only.split(",")]
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    out = ROOT / "benchmarks" / "results" / f"{date.today()}-{gpu}-train-throughput"
    old = json.loads(Path(f"{out}.json").read_text())["rows"] if Path(f"{out}.json").exists() else []
    rows: dict[str, dict] = {}  # an invocation with --only replaces its own rows and keeps the others
    for r in old:  # a second row of one variant: an earlier invocation's PEFT row, kept by merge_row
        rows[r["variant"] if r["variant"] not in rows else f"{r['variant']}@{r.get('invocation')}"] = r
    invocation = time.strftime("%Y-%m-%dT%H:%M:%S")
    meta = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(), layers=a.layers, bs=a.bs, seq=a.seq,
                qlora_bs=a.qlora_bs, peak_tflops=PEAK_TFLOPS, measured_tflops=MEASURED_TFLOPS)
    for variant, mode, *keep in plan:
        bs = a.qlora_bs if variant == "dsft_qlora" else a.bs
        cmd = [sys.executable, __file__, "--variant", variant, "--layers", str(a.layers), "--bs", str(bs), "--seq", str(a.seq),
               "--steps", str(a.steps)] + (["--compile"] if mode is True else []) + (["--longest"] if mode == "longest" else []) \
            + (TRAIN_FLAGS if mode == "train" else []) \
            + (["--keep-layers", str(keep[0])] if keep else []) + (["--recompute-attention-inputs"] if keep[1:] else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, check=False)
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
        row = json.loads(line) if line else {"variant": _name(variant, mode, *keep), "error": proc.stderr.strip().splitlines()[-3:]}
        extra = [ln for ln in proc.stderr.splitlines() if ln.startswith('{"esft_selected_share"')]
        if extra:
            row.update(json.loads(extra[-1]))
        row["invocation"] = invocation
        print(json.dumps(row), flush=True)
        merge_row(rows, row)
        _write_table(out, rows, meta)  # after each row: an invocation cut short keeps what it measured


def merge_row(rows: dict[str, dict], row: dict) -> None:
    """``row`` in place of its variant's; a PEFT row it replaces stays (keyed with its invocation) while rows of
    that invocation remain, since their ``ratio_to_peft`` is against it, and goes with the last of them."""
    old = rows.get(row["variant"])
    if row["variant"] == "peft_experts" and old and old.get("invocation") != row.get("invocation") \
            and any(r.get("invocation") == old.get("invocation") for r in rows.values() if r is not old):
        rows[f"peft_experts@{old['invocation']}"] = old
    rows[row["variant"]] = row
    for key in [k for k in rows if k.startswith("peft_experts@")]:  # a kept PEFT row whose rows are all replaced
        if not any(r.get("invocation") == rows[key].get("invocation") for k, r in rows.items() if k != key):
            del rows[key]


def _write_table(out: Path, rows: dict[str, dict], meta: dict) -> None:
    """The JSON and markdown table; a dsft row's ``ratio_to_peft`` only against the PEFT row of its own invocation
    (rows kept from an earlier one keep theirs)."""
    peft = rows.get("peft_experts", {})
    for r in rows.values():
        if "tokens_per_s" in r and r["variant"].startswith("dsft") and r.get("invocation") == peft.get("invocation") \
                and peft.get("tokens_per_s"):
            r["ratio_to_peft"] = round(r["tokens_per_s"] / peft["tokens_per_s"], 2)
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "rows": list(rows.values())}, indent=2))
    Path(f"{out}.md").write_text(table(rows.values()))


def table(rows) -> str:
    """The markdown table of ``--all``'s rows (``invocation``: when the row's ``--all`` started)."""
    lines = ["| variant | batch x seq | tokens/s | peak GiB | MFU (989) | MFU (776 measured) | ratio to PEFT | invocation |",
             "|---|---|---|---|---|---|---|---|"]
    # the newest invocation first, its PEFT row at its head; rows from before invocations were stamped last
    for r in sorted(rows, key=lambda r: (r.get("invocation") or "", r["variant"] == "peft_experts"), reverse=True):
        when = r.get("invocation") or ""
        if "longest_seq" in r or "tried" in r:
            lines.append(f"| {r['variant']} | 1 x {r.get('longest_seq')} | | {r.get('peak_gib', '')} | | | | {when} |")
            continue
        shape = f"{r['bs']} x {r['seq']}" if "bs" in r else ""
        lines.append(f"| {r['variant']} | {shape} | {r.get('tokens_per_s', r.get('error'))} | {r.get('peak_gib', '')} | "
                     f"{r.get('mfu_vs_989', '')} | {r.get('mfu_vs_measured', '')} | {r.get('ratio_to_peft', '')} | {when} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant")
    p.add_argument("--all", action="store_true")
    p.add_argument("--only", help="comma-separated subset for --all, e.g. dsft_lora+compile,frozen+compile")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--dense-fold", action="store_true", help="dsft LoRA variants: also fold attention/shared-expert LoRA A")
    p.add_argument("--compile-mode", help="torch.compile mode for --compile (experiments), e.g. reduce-overhead")
    p.add_argument("--inductor", action="append", metavar="KEY=VALUE",
                   help="set torch._inductor.config.KEY for --compile (experiments), e.g. combo_kernels=True; repeatable")
    p.add_argument("--functorch", action="append", metavar="KEY=VALUE",
                   help="set torch._functorch.config.KEY for --compile (experiments), e.g. activation_memory_budget=0.7")
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)  # timed steps; with 6, run-to-run spread was ~3%
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--timeout", type=int, default=400)
    p.add_argument("--qlora-bs", type=int, default=1)
    p.add_argument("--graphs", action="store_true", help="dsft's training CUDA graphs (dsft/recipes/graphs.py)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one more step: GPU time of forward + backward and optimizer, kernel time, wall time")
    p.add_argument("--top", type=int, default=15, help="with --profile: the kernels listed")
    p.add_argument("--packed", action="store_true", help="packed SFT-like rows (as dsft train packs them) instead of random rows")
    p.add_argument("--attn", help="attention implementation: dsft_varlen (dsft train's on a GPU), flex_attention, sdpa")
    p.add_argument("--keep-layers", default="0", help="leave the last N decoder layers out of activation checkpointing "
                   "(auto: as many as dsft train's default plans on this card)")
    p.add_argument("--recompute-attention-inputs", action="store_true",
                   help="kept layers recompute their attention's inputs in backward, keeping the kernel's outputs (as dsft "
                        "train --recompute-attention; dsft/kernels/attention_recompute.py)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"),
                   help="adamw8bit: bitsandbytes' 8-bit moments, as dsft train --optimizer adamw8bit")
    p.add_argument("--memory-at-peak", type=int, default=0, metavar="N",
                   help="record the allocator's history over the warm-up steps and print (stderr, JSON) the N places "
                        "whose blocks are alive at the peak, most bytes first (dsft/eval/memory_peak.py)")
    p.add_argument("--longest", action="store_true", help="with --variant: the longest sequence at batch 1")
    p.add_argument("--longest-max", type=int, default=262144)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.all:
        run_all(a)
    elif a.longest:
        print(json.dumps(run_longest(a)), flush=True)
    else:
        print(json.dumps(run_one(a)), flush=True)
    release()
