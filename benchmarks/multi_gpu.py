"""Multi-GPU training with dsft's own pieces (FSDP2 sharding, global-batch step sync, the training loop) on a
DeepSeek-V2-Lite-shaped model (random bf16 weights, LoRA r16 on attention + routed experts, fast expert LoRA,
gradient checkpointing), 1 GPU against 2:

    python benchmarks/multi_gpu.py --all                        # on a 2-GPU machine: JSON + markdown in benchmarks/results/
    python benchmarks/multi_gpu.py --all --device cpu --preset tiny-deepseek-v2 --bs 4 --seq 64 --steps 4 --results /tmp/mg
                                                                # the same flow on CPU processes (gloo): a smoke test

Runs (each a torchrun of this file with --worker; every rank builds the same random model from the same seed):
  single    1 GPU, global batch --bs                          the reference loss curve and 1-GPU tokens/s
  fsdp_same 2 GPUs (FSDP2), global batch --bs (--bs/2 each)   loss match: the same examples every step
  fsdp_2x   2 GPUs (FSDP2), global batch 2 x --bs             throughput ratio at the same per-GPU batch
  probe_*   per-GPU batch doubled from --probe-start until it no longer fits (seq --seq), 1 GPU unsharded vs 2 GPUs FSDP2
The whole --all stays under --budget seconds (default 450): probes stop early when time runs short.
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


def build(preset: str, layers: int | None, device: str, seed: int = 0):
    """The preset's architecture with random weights, built on the device (no 31 GB file), LoRA attached."""
    from transformers import AutoModelForCausalLM

    from dsft.adapters.lora import LoraSettings, attach_lora
    from dsft.base.arch import spec_for
    from dsft.base.presets import PRESETS

    cfg = PRESETS[preset].make_config(4096)
    if layers:
        cfg.num_hidden_layers = layers
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    model = model.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.fill_(1.0) if "norm" in n else p.normal_(0, 0.02)
    for m in model.modules():  # rotary buffers were on meta (to_empty left them uninitialised)
        if hasattr(m, "inv_freq"):
            with torch.device(device):
                fresh = type(m)(m.config)
            m.inv_freq, m.original_inv_freq, m.attention_scaling = fresh.inv_freq, fresh.original_inv_freq, fresh.attention_scaling
    model.config.use_cache = False
    if device.startswith("cuda"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    spec = spec_for(cfg.model_type)
    model = attach_lora(model, spec, LoraSettings(r=16, alpha=32, targets=("attention", "routed_experts")))
    if device.startswith("cuda"):
        model.enable_input_require_grads()
    return model, spec, cfg


def worker(a) -> None:
    """One rank: build, shard (2 processes), train or probe; rank 0 appends JSON lines to --out."""
    import torch.distributed as td

    from dsft.base.router import RouterProbe
    from dsft.data.tokenize import Examples
    from dsft.recipes.distributed import Dist
    from dsft.recipes.loop import train_steps
    from dsft.recipes.sources import StageData, stage_batches

    dist = Dist.from_env(a.device)
    device = dist.device(a.device) if a.device != "cpu" else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    model, spec, cfg = build(a.preset, a.layers, device)
    dist.prepare(model, spec)
    if a.compile and device.startswith("cuda"):
        from dsft.kernels.compile import compile_decoder_layers

        compile_decoder_layers(model)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    params = [p for p in model.parameters() if p.requires_grad]
    base = model.get_base_model()

    def write(row: dict) -> None:
        if dist.main:
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")

    def peak() -> float:
        if not device.startswith("cuda"):
            return 0.0
        t = torch.tensor([torch.cuda.max_memory_allocated() / 2**30], device=device)
        if dist.enabled:
            td.all_reduce(t, op=td.ReduceOp.MAX)
        return round(float(t), 2)

    def run(global_bs: int, steps: int) -> tuple[list[float], list[float]]:
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, cfg.vocab_size, (steps * global_bs, a.seq), generator=g)
        data = StageData(Examples(ids, ids.clone(), torch.ones_like(ids)), {}, {})
        optimizer = torch.optim.AdamW(params, lr=a.lr)
        probe = RouterProbe(base, spec, global_stats=dist.enabled)
        times: list[float] = []
        last = [time.perf_counter()]

        def on_step(info) -> None:  # called once the step's figures are read: it has finished on the device
            now = time.perf_counter()
            times.append(now - last[0])
            last[0] = now
        try:
            losses = train_steps(model, optimizer, stage_batches(data, global_bs, device, (dist.rank, dist.world)),
                                 steps=steps, peak_lrs=[a.lr], warmup=0, schedule="constant", grad_clip=1.0, probe=probe,
                                 on_step=on_step, sync=dist.step_sync(data.examples, global_bs))
        finally:
            probe.close()
        return losses, times

    if a.mode == "train":
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        losses, times = run(a.global_bs, a.steps)
        steady = times[2:] or times
        write({"run": a.name, "world": dist.world, "global_bs": a.global_bs, "seq": a.seq, "losses": losses,
               "tokens_per_s": round(a.global_bs * a.seq / (sum(steady) / len(steady)), 1), "peak_gib": peak()})
    else:  # probe: double the per-GPU batch until it fails; the process dies on OOM and the driver keeps the last line
        per_gpu = a.probe_start
        while per_gpu <= a.probe_max and time.time() < a.deadline:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            run(per_gpu * dist.world, 2)
            write({"run": a.name, "world": dist.world, "per_gpu_bs": per_gpu, "seq": a.seq, "tokens_per_gpu": per_gpu * a.seq,
                   "peak_gib": peak()})
            per_gpu *= 2
    dist.close()


def launch(a, name: str, nproc: int, mode: str, global_bs: int, out: Path, timeout: float) -> list[dict]:
    from dsft.recipes.launch import free_port

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if nproc > 1:  # what an accelerate FSDP config exports (see dsft.recipes.launch)
        env.update({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_TRANSFORMER_CLS_TO_WRAP": "DeepseekV2DecoderLayer"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           __file__, "--worker", "--name", name, "--mode", mode, "--global-bs", str(global_bs), "--out", str(out),
           "--preset", a.preset, "--seq", str(a.seq), "--steps", str(a.steps), "--lr", str(a.lr), "--device", a.device,
           "--probe-start", str(a.probe_start), "--probe-max", str(a.probe_max), "--deadline", str(a.deadline)]
    cmd += (["--layers", str(a.layers)] if a.layers else []) + (["--compile"] if a.compile else [])
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=max(30.0, timeout))
        status = "ok" if proc.returncode == 0 else ("stopped (out of memory)" if "out of memory" in proc.stderr.lower()
                                                     else f"failed: {proc.stderr.strip().splitlines()[-1:]}")
    except subprocess.TimeoutExpired:
        status = "timed out"
    rows = [json.loads(line) for line in out.read_text().splitlines() if json.loads(line)["run"] == name] if out.exists() else []
    print(json.dumps({"run": name, "status": status, "seconds": round(time.time() - t0, 1), "rows": len(rows)}), flush=True)
    return rows


def run_all(a) -> None:
    start = time.time()
    a.deadline = start + a.budget
    results = Path(a.results)
    results.mkdir(parents=True, exist_ok=True)
    tag = "h200x2" if a.device != "cpu" and "H200" in torch.cuda.get_device_name() else ("cpu" if a.device == "cpu" else
                                                                                            torch.cuda.get_device_name().replace(" ", "-"))
    out = results / f"{date.today()}-{tag}-multi-gpu.jsonl"
    out.unlink(missing_ok=True)
    left = lambda: a.deadline - time.time()  # noqa: E731
    single = launch(a, "single", 1, "train", a.bs, out, left())
    same = launch(a, "fsdp_same", 2, "train", a.bs, out, left())
    double = launch(a, "fsdp_2x", 2, "train", 2 * a.bs, out, left())
    probe_1 = launch(a, "probe_1gpu", 1, "probe", 0, out, left() / 2)
    probe_2 = launch(a, "probe_fsdp2", 2, "probe", 0, out, left())
    summary: dict = {"preset": a.preset, "layers": a.layers, "seq": a.seq, "steps": a.steps, "bs": a.bs, "compile": a.compile,
                     "torch": torch.__version__, "device": torch.cuda.get_device_name() if a.device != "cpu" else "cpu",
                     "seconds": round(time.time() - start, 1)}
    if single and same:
        x, y = single[0]["losses"], same[0]["losses"]
        summary["loss_max_abs_diff_same_global_batch"] = max(abs(p - q) for p, q in zip(x, y))
        summary["final_loss"] = {"1gpu": x[-1], "2gpu_fsdp": y[-1]}
    if single and double:
        summary["tokens_per_s"] = {"1gpu": single[0]["tokens_per_s"], "2gpu_fsdp_same_per_gpu_batch": double[0]["tokens_per_s"]}
        summary["throughput_ratio_2gpu_vs_1gpu"] = round(double[0]["tokens_per_s"] / single[0]["tokens_per_s"], 3)
        summary["peak_gib"] = {"1gpu": single[0]["peak_gib"], "2gpu_fsdp": double[0]["peak_gib"]}
    summary["largest_tokens_per_gpu"] = {"1gpu_unsharded": max((r["tokens_per_gpu"] for r in probe_1), default=None),
                                         "2gpu_fsdp2": max((r["tokens_per_gpu"] for r in probe_2), default=None)}
    rows = single + same + double + probe_1 + probe_2
    Path(out.with_suffix(".json")).write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    ratio = summary.get("throughput_ratio_2gpu_vs_1gpu")
    lines = [f"Multi-GPU LoRA training ({a.preset}, seq {a.seq}, {a.steps} steps; `benchmarks/multi_gpu.py`)", "",
             "| measure | 1 GPU | 2 GPUs (FSDP2) |", "|---|---|---|",
             f"| final loss, global batch {a.bs} | {summary.get('final_loss', {}).get('1gpu')} | {summary.get('final_loss', {}).get('2gpu_fsdp')} |",
             f"| max loss difference over the steps | | {summary.get('loss_max_abs_diff_same_global_batch')} |",
             f"| tokens/s, {a.bs} x {a.seq} per GPU | {summary.get('tokens_per_s', {}).get('1gpu')} | "
             f"{summary.get('tokens_per_s', {}).get('2gpu_fsdp_same_per_gpu_batch')} (x{ratio}) |",
             f"| peak GiB per GPU at that batch | {summary.get('peak_gib', {}).get('1gpu')} | {summary.get('peak_gib', {}).get('2gpu_fsdp')} |",
             f"| largest batch x seq per GPU that fits (tried up to {a.probe_max} x {a.seq}) | "
             f"{summary['largest_tokens_per_gpu']['1gpu_unsharded']} | {summary['largest_tokens_per_gpu']['2gpu_fsdp2']} |"]
    Path(out.with_suffix(".md")).write_text("\n".join(lines) + "\n")
    out.unlink(missing_ok=True)
    print("\n".join(lines))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", action="store_true", help="run everything and write the results")
    p.add_argument("--preset", default="deepseek-v2-lite-shape")
    p.add_argument("--layers", type=int, default=None, help="fewer decoder layers (default: the preset's)")
    p.add_argument("--bs", type=int, default=8, help="global batch of the loss-match runs (per GPU for the throughput ratio)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a gloo smoke run")
    p.add_argument("--compile", action="store_true", help="torch.compile each decoder layer (as dsft train does on a GPU)")
    p.add_argument("--probe-start", type=int, default=8, help="first per-GPU batch of the fit probes")
    p.add_argument("--probe-max", type=int, default=128)
    p.add_argument("--budget", type=float, default=450.0, help="seconds for --all")
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["train", "probe"], help=argparse.SUPPRESS)
    p.add_argument("--global-bs", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, default=float("inf"), help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.worker:
        worker(args)
    elif args.all:
        run_all(args)
    else:
        p.print_help()
