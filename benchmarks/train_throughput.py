"""Training throughput of MoE LoRA on a DeepSeek-V2-Lite-shaped model (random weights, bf16), one variant per process.

    python benchmarks/train_throughput.py --all [--layers 27] [--bs 4] [--seq 2048]    # every variant, JSON + markdown
    python benchmarks/train_throughput.py --variant dsft_lora --compile               # one variant, one JSON line

Variants (all: gradient checkpointing, LoRA r16 alpha 32, AdamW, batch x seq tokens per step):
  peft_experts      PEFT LoRA on attention + routed experts (target_parameters), experts grouped_mm  (the baseline)
  peft_attn         PEFT LoRA on attention only
  frozen            nothing trainable, input gradients only (the ceiling)
  dsft_lora         dsft: LoRA on attention + shared + routed experts, expert LoRA on routed tokens (grouped GEMMs)
Each variant with --compile compiles every decoder layer.
"""
from __future__ import annotations

import argparse
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


def prepare(variant: str, layers: int, rank: int):
    from peft import LoraConfig, get_peft_model

    from dsft.adapters.lora import LoraSettings, attach_lora
    from dsft.base.arch import ARCHITECTURES

    model = build_model(layers)
    attn = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    if variant == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()
        return model, model.model.layers
    if variant in ("peft_experts", "peft_attn"):
        kw = dict(r=rank, lora_alpha=2 * rank, target_modules=attn, lora_dropout=0.0)
        if variant == "peft_experts":
            kw["target_parameters"] = ["experts.gate_up_proj", "experts.down_proj"]
        model = get_peft_model(model, LoraConfig(**kw))
        return model, model.base_model.model.model.layers
    if variant == "dsft_lora":
        model = attach_lora(model, ARCHITECTURES["deepseek_v2"], LoraSettings(r=rank, alpha=2 * rank))
        model.enable_input_require_grads()
        return model, model.base_model.model.model.layers
    raise SystemExit(f"unknown variant {variant}")


def run_one(a) -> dict:
    from dsft.recipes.loop import causal_lm_loss, lm_loss

    model, layers = prepare(a.variant, a.layers, a.rank)
    if a.compile:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = 128
        dynamo.config.accumulated_cache_size_limit = 1024
        for layer in layers:
            layer.compile()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    x = torch.randint(0, 102400, (a.bs, a.seq), device="cuda")

    batch = {"input_ids": x, "labels": x, "attention_mask": torch.ones_like(x)}

    def step():
        # dsft trains with its chunked loss; the PEFT variants get what a PEFT user gets: full logits.
        loss = lm_loss(model, batch) if a.variant.startswith("dsft") else causal_lm_loss(model(input_ids=x, use_cache=False).logits, x)
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    for _ in range(2):
        step()
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / a.steps
    tps = a.bs * a.seq / dt
    fpt = flops_per_token(lite_config(a.layers), a.seq)
    return dict(variant=a.variant + ("+compile" if a.compile else ""), layers=a.layers, bs=a.bs, seq=a.seq,
                s_per_step=round(dt, 3), tokens_per_s=round(tps), peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 1),
                trainable_m=round(sum(p.numel() for p in trainable) / 1e6, 1), tflops=round(tps * fpt / 1e12, 1),
                mfu_vs_989=round(tps * fpt / PEAK_TFLOPS / 1e12, 3), warmup_s=round(warm, 1), loss=round(loss.item(), 4))


def run_all(a) -> None:
    plan = [("peft_experts", False), ("peft_attn", True), ("frozen", True), ("dsft_lora", False), ("dsft_lora", True)]
    if a.only:
        plan = [p for p in plan if f"{p[0]}{'+compile' if p[1] else ''}" in a.only.split(",")]
    rows = []
    for variant, compiled in plan:
        cmd = [sys.executable, __file__, "--variant", variant, "--layers", str(a.layers), "--bs", str(a.bs), "--seq", str(a.seq),
               "--steps", str(a.steps)] + (["--compile"] if compiled else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
        line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
        row = json.loads(line) if line else {"variant": variant + ("+compile" if compiled else ""), "error": proc.stderr.strip().splitlines()[-1:] }
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = next((r["tokens_per_s"] for r in rows if r.get("variant") == "peft_experts" and "tokens_per_s" in r), None)
    for r in rows:
        if base and "tokens_per_s" in r and r["variant"].startswith("dsft"):
            r["ratio_to_peft"] = round(r["tokens_per_s"] / base, 2)
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    out = ROOT / "benchmarks" / "results" / f"{date.today()}-{gpu}-train-throughput"
    meta = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name(), layers=a.layers, bs=a.bs, seq=a.seq)
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| variant | tokens/s | peak GiB | MFU (989) | ratio to PEFT |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r.get('tokens_per_s', r.get('error'))} | {r.get('peak_gib', '')} | "
                     f"{r.get('mfu_vs_989', '')} | {r.get('ratio_to_peft', '')} |")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant")
    p.add_argument("--all", action="store_true")
    p.add_argument("--only", help="comma-separated subset for --all, e.g. dsft_lora+compile,frozen+compile")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--layers", type=int, default=27)
    p.add_argument("--bs", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--timeout", type=int, default=400)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.all:
        run_all(a)
    else:
        print(json.dumps(run_one(a)), flush=True)
