"""Runtime benchmark: attach / swap / detach times and generation tokens/s, dsft runtime vs plain PEFT `generate`.

    python benchmarks/runtime_bench.py                       # H100: DeepSeek-V2-Lite shape (random bf16 weights), < 6 min
    python benchmarks/runtime_bench.py --base tiny-deepseek-v2 --device cpu --new-tokens 8 --concurrent 4   # smoke run

By default the DeepSeek-V2-Lite-shaped model (27 layers, 64 routed experts top-6 + 2 shared) is built in GPU
memory with random weights (no 31 GB checkpoint to write and read back); ``--base`` loads a preset or model
directory instead. Four synthetic adapters (finance, legal, medical, finance v2: LoRA r16 on attention, shared
and routed experts, plus their domain terms; ``tax`` has no pack, so no terms) are written and registered in a
throwaway registry (the user's is never touched), then:

1. attach (cold, from the registry: sha256 check + compatibility + load), attach a second, swap (a new version
   of an attached domain), detach: wall time, and GPU memory held/freed; then, on this device and dtype, each
   row of a mixed batch against its adapter alone, next to the noise floor (one adapter batched vs alone);
2. runtime generation, greedy, ``--new-tokens`` tokens per request (EOS ignored), through the continuous-batching
   engine: 1 request; ``--concurrent`` requests for one adapter; ``--concurrent`` requests over 4 adapters mixed
   in one batch; the same with ``--prompt-tokens`` prompts (time to first token p50 / p99);
   ``--concurrent-high`` requests over 4 adapters;
3. plain PEFT on the same model in the same process (``PeftModel`` + ``generate``, the model's experts on
   ``grouped_mm``): batch 1; batch ``--concurrent`` one adapter; 4 adapters: one ``generate`` per adapter, then
   PEFT's mixed-batch ``adapter_names=`` is tried (it refuses ``target_parameters`` LoRA) and its error recorded.

Writes benchmarks/results/<date>-<gpu>-runtime.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DOMAINS = ("finance", "legal", "medical", "tax")
PROMPTS = [
    "The collateralized debt obligation desk reviewed the tranche and",
    "The court granted the writ of habeas corpus because the petitioner",
    "Patients presenting with acute myocardial infarction were treated with",
    "The audit of the deferred tax asset showed that the company",
]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gib(device: str) -> float:
    return round(torch.cuda.memory_allocated() / 2**30, 3) if device.startswith("cuda") else 0.0


def build_lite(device: str):
    """DeepSeek-V2-Lite shape with random bf16 weights, in memory, as a dsft LoadedBase with a fingerprint."""
    from transformers import DeepseekV2ForCausalLM

    from dsft.atomic import sha256_bytes, sha256_json
    from dsft.base.arch import ARCHITECTURES
    from dsft.base.fingerprint import fingerprint_id, tokenizer_hash
    from dsft.base.loading import BaseRef, LoadedBase
    from dsft.base.presets import PRESETS, SEED, TOKENIZER_VOCAB
    from dsft.base.tokenizer import train_bpe
    from dsft.domains import corpus_text_for_tokenizer

    tokenizer = train_bpe(corpus_text_for_tokenizer(seed=SEED), TOKENIZER_VOCAB)
    config = PRESETS["deepseek-v2-lite-shape"].make_config(len(tokenizer))
    torch.manual_seed(SEED)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM._from_config(config, dtype=dtype)
    model = model.to_empty(device=device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if "norm" in name else p.normal_(0, 0.02)
    for m in model.modules():  # rotary buffers were on meta
        if hasattr(m, "inv_freq") and hasattr(m, "rope_init_fn"):
            inv, scaling = m.rope_init_fn(m.config, torch.device(device))
            m.inv_freq, m.original_inv_freq, m.attention_scaling = inv, inv, scaling
    model.eval()
    model.generation_config.pad_token_id = config.pad_token_id
    fp = {"architecture": "DeepseekV2ForCausalLM", "model_type": "deepseek_v2",
          "config_hash": sha256_json({k: v for k, v in config.to_dict().items() if k not in ("transformers_version", "dtype")}),
          "tokenizer_hash": tokenizer_hash(tokenizer), "weights_hash": sha256_bytes(b"random normal(0, 0.02), seed 0"),
          "vocab_size": config.vocab_size, "tokenizer_size": len(tokenizer),
          "param_shapes": {n: list(p.shape) for n, p in model.named_parameters()}}
    fp["id"] = fingerprint_id(fp)
    ref = BaseRef("deepseek-v2-lite-shape", "bench:deepseek-v2-lite-shape(random, in memory)", Path(tempfile.gettempdir()))
    return LoadedBase(ref, model, tokenizer, ARCHITECTURES["deepseek_v2"], fp)


def throwaway_registry(prefix: str):
    """A registry and adapter store in a new temporary directory: the user's registry never sees the synthetic adapters."""
    from dsft.registry import open_registry

    home = Path(tempfile.mkdtemp(prefix=prefix))
    return home, open_registry(f"sqlite:///{home / 'registry.db'}", adapters_root=home / "adapters")


def bench_base(base: str | None, device: str):
    """``base`` (a preset or model directory) loaded, or without one the lite shape built in memory."""
    if base:
        from dsft.base import load_base

        return load_base(base, device=device)
    return build_lite(device)


def timed(fn, device: str):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def run_scenario(engine, adapters: list, prompt_tokens: int | None, new_tokens: int, device: str) -> dict:
    """One scenario through the engine: every request from its own thread at once; tokens/s, time to first token
    and the time between a request's tokens after its first (its decode speed, without the wait and the prefill)."""
    from dsft.runtime.engine import Request

    results: list = [None] * len(adapters)
    first_token: list[float | None] = [None] * len(adapters)
    last_token: list[float] = [0.0] * len(adapters)
    g = torch.Generator().manual_seed(0)
    vocab = len(engine.runtime.tokenizer)
    prompts = [torch.randint(100, vocab, (prompt_tokens,), generator=g).tolist() if prompt_tokens else None
               for _ in adapters]

    def ask(i: int) -> None:
        def on_token() -> None:
            last_token[i] = time.perf_counter()
            if first_token[i] is None:
                first_token[i] = last_token[i]
        text = None if prompts[i] else PROMPTS[i % len(PROMPTS)]
        results[i] = engine.generate(Request(adapter=adapters[i], prompt=text, prompt_ids=prompts[i], raw=True,
                                             max_new_tokens=new_tokens, ignore_eos=True, on_token=on_token))
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(adapters))]
    sync(device)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = sum(r.completion_tokens for r in results)
    ttft = sorted(f - t0 for f in first_token if f is not None)
    itl = sorted((last - first) / (r.completion_tokens - 1) for first, last, r in zip(first_token, last_token, results)
                 if first is not None and r.completion_tokens > 1)
    return {"generated": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "inter_token_ms_p50": round(itl[len(itl) // 2] * 1000, 2) if itl else None,
            "ttft_p50_s": round(ttft[len(ttft) // 2], 3) if ttft else None,
            "ttft_p99_s": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))], 3) if ttft else None}


def runtime_generation(runtime, scenarios, new_tokens: int, device: str, batch_wait_ms: float, max_batch: int) -> list[dict]:
    """Tokens/s and time to first token of the runtime through the continuous-batching engine, concurrent
    requests from threads. A scenario is (key, name, adapters[, prompt tokens]): with a prompt length, each
    request's prompt is that many random token ids (seeded) instead of the short text prompts. Each runs
    twice: the first ("cold") captures the CUDA graphs of (rows, width) buckets it is the first to reach; the
    figures are the second's (a server that has been up a while), the cold tokens/s is kept beside them."""
    from dsft.runtime.engine import Engine, Request

    engine = Engine(runtime, max_batch_size=max_batch, max_wait_s=batch_wait_ms / 1000)
    rows = []
    try:
        engine.generate(Request(adapter=scenarios[0][2][0], prompt=PROMPTS[0], raw=True, max_new_tokens=4,
                                ignore_eos=True))  # warm-up
        for key, name, adapters, *length in scenarios:
            prompt_tokens = length[0] if length else None
            cold = run_scenario(engine, adapters, prompt_tokens, new_tokens, device)
            warm = run_scenario(engine, adapters, prompt_tokens, new_tokens, device)
            rows.append({"engine": "dsft runtime", "key": key, "scenario": name, "requests": len(adapters),
                         "adapters": len(set(adapters)), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                         **warm, "cold_tokens_per_s": cold["tokens_per_s"], "largest_batch": engine.counts.get("largest")})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        engine.close()
    return rows


def peft_generation(model, tokenizer, paths: dict[str, str], concurrent: int, new_tokens: int, device: str) -> list[dict]:
    """Plain PEFT on the same model: PeftModel.from_pretrained + load_adapter, then model.generate."""
    from peft import PeftModel

    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("grouped_mm" if device.startswith("cuda") else "eager")
    names = list(paths)
    peft_model = PeftModel.from_pretrained(model, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.load_adapter(paths[name], adapter_name=name)
    peft_model.eval()
    tokenizer.padding_side = "left"

    def generate(prompts, adapter_names=None):
        enc = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
        kw = {"adapter_names": adapter_names} if adapter_names else {}
        with torch.inference_mode():
            out = peft_model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                      pad_token_id=tokenizer.pad_token_id, **kw)
        return (out.shape[1] - enc.input_ids.shape[1]) * out.shape[0]

    rows = []
    peft_model.set_adapter(names[0])
    generate(PROMPTS[:1])  # warm-up
    for key, scenario, n in (("1x1", "1 request, 1 adapter", 1), ("Nx1", f"{concurrent} requests, 1 adapter", concurrent)):
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
        tokens, seconds = timed(lambda: generate(prompts), device)
        rows.append({"engine": "plain PEFT generate", "key": key, "scenario": scenario, "requests": n, "adapters": 1,
                     "new_tokens": new_tokens, "generated": tokens, "seconds": round(seconds, 3),
                     "tokens_per_s": round(tokens / seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    mixed = [names[i % 4] for i in range(concurrent)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(concurrent)]

    def per_adapter():
        total = 0
        for name in names[:4]:
            peft_model.set_adapter(name)
            total += generate([p for p, a in zip(prompts, mixed) if a == name])
        return total
    tokens, seconds = timed(per_adapter, device)
    try:  # last: a refused mixed batch can leave PEFT's adapter_names hooks behind
        generate(prompts, adapter_names=mixed)
        mixed_error = None
    except Exception as exc:  # PEFT: ParamWrapper "does not support mixed adapter batches"
        mixed_error = f"{type(exc).__name__}: {str(exc)[:200]}"
    rows.append({"engine": "plain PEFT generate", "key": "Nx4", "scenario": f"{concurrent} requests, 4 adapters (one generate per adapter)",
                 "requests": concurrent, "adapters": 4, "new_tokens": new_tokens, "generated": tokens,
                 "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
                 "mixed_batch_error": mixed_error})
    print(json.dumps(rows[-1]), flush=True)
    peft_model.unload()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="preset or model directory (default: lite shape built in memory)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--concurrent", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=20.0)
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length of the time-to-first-token scenario")
    p.add_argument("--concurrent-high", type=int, default=128, help="requests of the high-concurrency scenario (0: skip)")
    p.add_argument("--no-peft", action="store_true", help="skip the PEFT baseline")
    p.add_argument("--fp8-experts", action="store_true", help="the runtime holds the routed experts in FP8 (no PEFT rows)")
    p.add_argument("--overlap-ab", action="store_true",
                   help="also run the generation scenarios with each decode step's tokens read before the next is "
                        "launched (DSFT_OVERLAP=0), in the same process, before the default")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from dsft.runtime.base import RuntimeBase
    from dsft.testing.adapters import make_adapter

    home, reg = throwaway_registry("dsft-runtime-bench-")
    t_start = time.perf_counter()
    loaded, load_s = timed(lambda: bench_base(a.base, a.device), a.device)
    print(f"base ready in {load_s:.1f}s; {gib(a.device)} GiB", flush=True)

    refs, make_s = {}, []
    for i, domain in enumerate(DOMAINS):
        rec, s = timed(lambda: make_adapter(loaded, domain, seed=i, r=a.rank, alpha=2 * a.rank, b_std=0.01, registry=reg), a.device)
        refs[domain] = rec
        make_s.append(round(s, 1))
    rec2, _ = timed(lambda: make_adapter(loaded, "finance", seed=10, r=a.rank, alpha=2 * a.rank, b_std=0.01, registry=reg), a.device)
    adapter_mb = round(sum(f.stat().st_size for f in Path(rec2.path).iterdir()) / 2**20, 1)
    print(f"adapters written: {make_s} s each, {adapter_mb} MB on disk", flush=True)

    runtime = RuntimeBase(loaded, registry=reg, fp8_experts=a.fp8_experts)  # (FP8: the loaded model's experts too)
    mem0 = gib(a.device)
    _, attach_cold = timed(lambda: runtime.attach(refs["finance"].ref), a.device)
    mem1 = gib(a.device)
    _, attach_second = timed(lambda: runtime.attach(refs["legal"].ref), a.device)
    _, swap = timed(lambda: runtime.attach(rec2.ref), a.device)
    mem_before_detach = gib(a.device)
    _, detach = timed(lambda: runtime.detach("legal"), a.device)
    mem_after_detach = gib(a.device)
    for domain in ("legal", "medical", "tax"):
        runtime.attach(refs[domain].ref)
    runtime.detach(rec2.ref)  # versions are attached side by side: back to finance@0.1.0 alone for the generation runs
    lifecycle = {"attach_cold_s": round(attach_cold, 3), "attach_second_s": round(attach_second, 3),
                 "swap_s": round(swap, 3), "detach_s": round(detach, 3),
                 "adapter_gpu_gib": round(mem1 - mem0, 3), "freed_by_detach_gib": round(mem_before_detach - mem_after_detach, 3),
                 "adapter_files_mb": adapter_mb, "added_tokens": runtime.adapters[refs["finance"].ref].added_tokens,
                 "fp8_experts": a.fp8_experts, "base_gpu_gib": round(mem0, 2)}
    print(json.dumps(lifecycle), flush=True)

    # Correctness on this device and dtype: each row of a mixed batch against the same adapter alone.
    probe = [(d, PROMPTS[i]) for i, d in enumerate(DOMAINS)]
    mixed = runtime.generate([p for _, p in probe], adapters=[d for d, _ in probe], max_new_tokens=16, ignore_eos=True)
    alone = [runtime.generate(p, adapter=d, max_new_tokens=16, ignore_eos=True) for d, p in probe]
    lm = runtime.logits([p for _, p in probe], adapters=[d for d, _ in probe])
    la = [runtime.logits([p], adapters=[d])[0] for d, p in probe]
    lifecycle["mixed_rows_equal_to_alone"] = f"{sum(m.token_ids == s.token_ids for m, s in zip(mixed, alone))}/{len(probe)}"
    lifecycle["mixed_vs_alone_max_logit_diff"] = round(max((x - y).abs().max().item() for x, y in zip(lm, la)), 5)
    # The noise floor of the dtype: each probe row alone vs in a batch of four rows of its own adapter (the other
    # rows other prompts), the max over the same four rows as the mixed figure (until 2026-12-02: the first row only).
    batched = [runtime.logits([p, *[q for q in PROMPTS[: len(probe)] if q != p][:3]], adapters=[d] * 4)[0]
               for d, p in probe]
    lifecycle["same_adapter_batch_vs_alone_max_logit_diff"] = round(max((x - y).abs().max().item()
                                                                         for x, y in zip(batched, la)), 5)
    lifecycle["max_abs_logit"] = round(max(x.abs().max().item() for x in la), 2)
    # Decode steps replayed as CUDA graphs vs run eagerly: the same greedy tokens (bf16: a bucket's padded
    # shapes may pick other GEMM kernels, so a late token can differ; counted, not asserted).
    os.environ["DSFT_CUDA_GRAPHS"] = "0"
    eager = runtime.generate([p for _, p in probe], adapters=[d for d, _ in probe], max_new_tokens=16, ignore_eos=True)
    os.environ.pop("DSFT_CUDA_GRAPHS")
    lifecycle["graph_vs_eager_equal_rows"] = f"{sum(m.token_ids == e.token_ids for m, e in zip(mixed, eager))}/{len(probe)}"
    lifecycle["graph_vs_eager_equal_tokens"] = round(sum(x == y for m, e in zip(mixed, eager) for x, y in zip(m.token_ids, e.token_ids))
                                                     / sum(len(m.token_ids) for m in mixed), 3)
    # What an attach costs, part by part: the registry check with every file hashed before reading (how
    # attach worked until 2026-12-01) vs reading with the hash computed while reading.
    from dsft.runtime.weights import read_adapter

    rec = reg.resolve(refs["medical"].ref)
    _, lifecycle["hash_all_files_s"] = timed(lambda: reg.resolve(rec.ref, verify_files=True), a.device)
    _, lifecycle["read_adapter_s"] = timed(lambda: read_adapter(Path(rec.path), rec.parsed_manifest(), loaded.model.config,
                                                                device=loaded.model.device, dtype=loaded.model.dtype), a.device)
    lifecycle["hash_all_files_s"] = round(lifecycle["hash_all_files_s"], 3)
    lifecycle["read_adapter_s"] = round(lifecycle["read_adapter_s"], 3)
    print(json.dumps(lifecycle), flush=True)

    n = a.concurrent
    scenarios = [("1x1", "1 request, 1 adapter", ["finance"]), ("Nx1", f"{n} requests, 1 adapter", ["finance"] * n),
                 ("Nx4", f"{n} requests, 4 adapters mixed in one batch", [DOMAINS[i % 4] for i in range(n)]),
                 ("base", f"{n} requests, base only", [None] * n),
                 ("Nx4-long", f"{n} requests, 4 adapters, {a.prompt_tokens}-token prompts", [DOMAINS[i % 4] for i in range(n)],
                  a.prompt_tokens)]
    if a.concurrent_high:
        scenarios.append(("Hx4", f"{a.concurrent_high} requests, 4 adapters mixed", [DOMAINS[i % 4] for i in range(a.concurrent_high)]))
    rows = []
    if a.overlap_ab:  # each step's tokens read before the next step is launched, as before 2026-12-01
        os.environ["DSFT_OVERLAP"] = "0"
        rows += [{**r, "engine": "dsft runtime, read each step"} for r in runtime_generation(
            runtime, scenarios, a.new_tokens, a.device, a.batch_wait_ms, max(n, a.concurrent_high, 1))]
        os.environ.pop("DSFT_OVERLAP")
    rows += runtime_generation(runtime, scenarios, a.new_tokens, a.device, a.batch_wait_ms, max(n, a.concurrent_high, 1))
    if a.device.startswith("cuda"):  # the same single stream with decode steps launched one by one
        os.environ["DSFT_CUDA_GRAPHS"] = "0"
        rows += runtime_generation(runtime, [("1x1-eager", "1 request, 1 adapter, no CUDA graphs", ["finance"])],
                                   a.new_tokens, a.device, a.batch_wait_ms, 1)
        os.environ.pop("DSFT_CUDA_GRAPHS")
    runtime.close()
    if not (a.no_peft or a.fp8_experts):
        paths = {d: refs[d].path for d in DOMAINS}
        rows += peft_generation(loaded.model, loaded.tokenizer, paths, n, a.new_tokens, a.device)

    for r in rows:
        match = next((q for q in rows if q["engine"] == "plain PEFT generate" and q["key"] == r["key"]), None)
        if r["engine"] == "dsft runtime" and match:
            r["speedup_vs_peft"] = round(r["tokens_per_s"] / match["tokens_per_s"], 2)
    import peft as peft_lib
    import transformers

    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    meta = {"device": device_name, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft_lib.__version__, "base": loaded.ref.name, "source": loaded.ref.source,
            "base_load_s": round(load_s, 1), "rank": a.rank, "new_tokens": a.new_tokens, "concurrent": n,
            "batch_wait_ms": a.batch_wait_ms, "wall_s": round(time.perf_counter() - t_start, 1)}
    out = Path(a.out) / f"{date.today()}-{device_name.replace(' ', '-')}-runtime{'-fp8-experts' if a.fp8_experts else ''}"
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "lifecycle": lifecycle, "generation": rows}, indent=2) + "\n")
    lines = [f"# dsft runtime on {device_name}: {loaded.ref.name} ({date.today()})", "",
             f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft_lib.__version__}; "
             f"LoRA r{a.rank} on attention + shared + routed experts, {lifecycle['added_tokens']} added terms per adapter; "
             f"greedy, {a.new_tokens} new tokens per request (EOS ignored); whole run {meta['wall_s']} s.", "",
             "| adapter lifecycle | value |", "|---|---|",
             f"| attach (cold: registry check + sha256 + load) | {lifecycle['attach_cold_s']} s |",
             f"| attach a second adapter | {lifecycle['attach_second_s']} s |",
             f"| attach a new version of an attached domain (beside it) | {lifecycle['swap_s']} s |",
             f"| detach | {lifecycle['detach_s']} s |",
             f"| of which: reading + verifying one adapter (hash while reading) / hashing every file beforehand (until 2026-12-01) | "
             f"{lifecycle['read_adapter_s']} / {lifecycle['hash_all_files_s']} s |",
             f"| GPU memory per adapter / freed by detach | {lifecycle['adapter_gpu_gib']} / {lifecycle['freed_by_detach_gib']} GiB |",
             f"| adapter files on disk | {adapter_mb} MB |",
             f"| GPU memory of the loaded base, no adapter (routed experts in FP8: {'yes' if a.fp8_experts else 'no'}) | "
             f"{lifecycle['base_gpu_gib']} GiB |",
             f"| mixed batch rows equal to the adapter alone (greedy, 16 tokens) | {lifecycle['mixed_rows_equal_to_alone']} |",
             f"| max logit difference, mixed vs alone (largest logit {lifecycle['max_abs_logit']}) | {lifecycle['mixed_vs_alone_max_logit_diff']} |",
             f"| the same, one adapter batched vs alone (the dtype's noise floor) | {lifecycle['same_adapter_batch_vs_alone_max_logit_diff']} |",
             f"| decode as CUDA graphs vs eager: rows equal / tokens equal (greedy, 16 tokens) | "
             f"{lifecycle['graph_vs_eager_equal_rows']} / {lifecycle['graph_vs_eager_equal_tokens']} |", "",
             "dsft rows: the second of two identical runs (the first, 'cold', captured CUDA graphs for new batch shapes).", "",
             "| engine | scenario | tokens/s | cold tokens/s | seconds | time to first token p50 / p99 s | "
             "ms between a request's tokens, p50 | vs PEFT |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ttft = f"{r['ttft_p50_s']} / {r['ttft_p99_s']}" if r.get("ttft_p50_s") is not None else ""
        lines.append(f"| {r['engine']} | {r['scenario']} | {r['tokens_per_s']} | {r.get('cold_tokens_per_s', '')} | "
                     f"{r['seconds']} | {ttft} | {r.get('inter_token_ms_p50', '') or ''} | {r.get('speedup_vs_peft', '')} |")
    err = next((r.get("mixed_batch_error") for r in rows if r.get("mixed_batch_error")), None)
    if err:
        lines += ["", f"PEFT mixed batch (`adapter_names=`) on this adapter: `{err}`"]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import shutil

    reg.close()
    shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
