"""Where a decode step's time goes: milliseconds per step of the runtime's running batch, CUDA graphs vs
eager, at several batch sizes, and the GPU kernels of one step (torch.profiler).

    python benchmarks/decode_profile.py                     # H200: lite shape (random bf16 weights), ~3 min
    python benchmarks/decode_profile.py --base tiny-deepseek-v2 --device cpu --sizes 1 4 --steps 3   # smoke run
    python benchmarks/decode_profile.py --fp8-experts --sizes 1 32 --admit 16 512   # where a first token's time goes

Rows are greedy requests over four adapters (LoRA r16 on attention + shared + routed experts, domain terms),
16-token prompts, decoding ``--steps`` timed steps after a few warm-up steps (graphs captured). This is the
decode loop alone (no engine thread, no HTTP); ``runtime_bench.py`` measures requests end to end.
Writes benchmarks/results/<date>-<gpu>-decode-profile.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def steps_ms(runtime, refs: list[str], rows_n: int, steps: int, graphs: bool, device: str, vocab: int,
             overlap: bool | None = None, prompt: int = 16):
    """Admit ``rows_n`` rows into a fresh running batch, warm up, then time ``steps`` decode steps (``overlap``:
    each launched before the previous one's tokens are read; default: as the runtime does on this device)."""
    g = torch.Generator().manual_seed(rows_n)
    rows = [runtime.make_row(torch.randint(100, vocab, (prompt,), generator=g).tolist(), runtime.resolve(refs[i % len(refs)]),
                             max_new_tokens=steps + 8, ignore_eos=True) for i in range(rows_n)]
    batch = runtime.batch(graphs=graphs, overlap=overlap)
    runtime.step(batch, rows)
    for _ in range(3):
        runtime.step(batch)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        runtime.step(batch)
    sync(device)
    ms = (time.perf_counter() - t0) / steps * 1000
    return ms, batch


def kernels(runtime, batch, device: str, top: int) -> tuple[float, list[dict]]:
    """GPU kernel time of one step (mean of 3), its kernels, and its top kernels by time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runtime.step(batch)
        sync(device)
    events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in events) / 3 / 1000
    count = sum(e.count for e in events) // 3
    events.sort(key=lambda e: -e.device_time_total)
    return total, count, [{"kernel": e.key[:90], "ms_per_step": round(e.device_time_total / 3 / 1000, 3), "calls_per_step": e.count // 3}
                   for e in events[:top]]


def op_profile(runtime, batch, device: str, top: int) -> list[dict]:
    """The eager step's aten ops by their own GPU time (mean of 3 steps), grouped by input shapes: which op of
    which layer part a kernel belongs to (a graph's kernels have no op attached)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(3):
            runtime.step(batch)
        sync(device)
    events = [e for e in prof.key_averages(group_by_input_shape=True)
              if e.device_type.name == "CPU" and e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    return [{"op": e.key, "shapes": str(e.input_shapes)[:120], "ms_per_step": round(e.self_device_time_total / 3 / 1000, 3),
             "calls_per_step": e.count // 3} for e in events[:top]]


def absorb_ab(runtime, refs: list[str], a, vocab: int, base_name: str) -> None:
    """ms a graph step, absorbed vs expanded MLA, per rows x prompt length; writes ``-mla-absorb.json`` / ``.md``."""
    from dsft.runtime import mla_decode

    results, default = [], (mla_decode.ABSORB_FROM, mla_decode.ABSORB_FROM_KERNELS)
    for prompt in a.absorb_ab:
        for n in a.sizes:
            row: dict = {"rows": n, "prompt_tokens": prompt}
            for name, absorb_from in (("expanded", 10**12), ("absorbed", 0), ("expanded_again", 10**12)):
                mla_decode.ABSORB_FROM = mla_decode.ABSORB_FROM_KERNELS = absorb_from
                ms, batch = steps_ms(runtime, refs, n, a.steps, True, a.device, vocab, prompt=prompt)
                row[f"{name}_ms"] = round(ms, 2)
                batch.abandon()
            print(json.dumps(row), flush=True)
            results.append(row)
    mla_decode.ABSORB_FROM, mla_decode.ABSORB_FROM_KERNELS = default
    device_name = torch.cuda.get_device_name()
    out = Path(a.out) / f"{date.today()}-{device_name.replace(' ', '-')}-mla-absorb"
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"device": device_name, "base": base_name, "results": results}, indent=2) + "\n")
    lines = [f"# Decode steps with DeepSeek-V2's attention absorbed vs expanded on {device_name} ({date.today()})", "",
             f"{base_name}, 4 adapters mixed, graph steps (ms); the expanded path ran before and after the absorbed one.", "",
             "| rows | prompt tokens | expanded ms | absorbed ms | expanded again ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['rows']} | {r['prompt_tokens']} | {r['expanded_ms']} | {r['absorbed_ms']} | {r['expanded_again_ms']} |"
              for r in results]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def host_profile(runtime, refs: list[str], steps: int, device: str) -> None:
    """The host's side of a decode step of 1 row: cProfile of ``steps`` steps (graphs captured), by own time."""
    import cProfile
    import io
    import pstats

    row = runtime.make_row(list(range(100, 116)), runtime.resolve(refs[0]), max_new_tokens=steps + 16, ignore_eos=True)
    batch = runtime.batch(graphs=True)
    runtime.step(batch, [row])
    for _ in range(8):  # past the capture
        runtime.step(batch)
    sync(device)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        runtime.step(batch)
    sync(device)
    prof.disable()
    batch.abandon()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
    print(out.getvalue())


def admission(runtime, refs: list[str], rows_n: int, prompt: int, device: str, repeats: int, top: int) -> dict:
    """Where the time of ``rows_n`` requests joining an empty batch goes (their time to first token without the
    engine's thread): the rows made (tokens to a row: adapter resolved, ids mapped), the joining step's host time
    and the wall time until every row has its first token (prompts prefilled, first tokens sampled and read: each
    row asks for one token, so the batch is empty again after it), and the GPU kernels of that. One batch for all
    admissions, as the engine keeps one: the first admission captures the shape's prefill graphs and is not timed
    (until 2026-12-02 each admission made a new batch, so every timed one captured its graphs anew)."""
    from torch.profiler import ProfilerActivity, profile

    g = torch.Generator().manual_seed(rows_n)
    prompts = [torch.randint(100, len(runtime.tokenizer), (prompt,), generator=g).tolist() for _ in range(rows_n)]
    batch = runtime.batch()

    def admit(timed: dict | None) -> None:
        t0 = time.perf_counter()
        rows = [runtime.make_row(ids, runtime.resolve(refs[i % len(refs)]), max_new_tokens=1, ignore_eos=True)
                for i, ids in enumerate(prompts)]
        sync(device)
        t1 = time.perf_counter()
        runtime.step(batch, rows)
        t2 = time.perf_counter()
        while len(batch):  # tokens read one step late (overlap) leave on the next step
            runtime.step(batch)
        sync(device)
        t3 = time.perf_counter()
        if any(len(r.tokens) != 1 for r in rows):
            raise RuntimeError("admission: a row did not get exactly one token")
        if timed is not None:
            for key, v in (("make_rows_ms", t1 - t0), ("step_host_ms", t2 - t1), ("first_tokens_wall_ms", t3 - t1)):
                timed.setdefault(key, []).append(v * 1000)
            timed["prefill_graphs"] = batch.prefill.captures if batch.prefill is not None else None

    admit(None)
    timed: dict = {}
    for _ in range(repeats):
        admit(timed)
    row: dict = {"rows": rows_n, "prompt_tokens": prompt, "prefill_graphs": timed.pop("prefill_graphs")}
    row.update({k: round(sorted(v)[len(v) // 2], 2) for k, v in timed.items()})  # medians
    if device.startswith("cuda"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            admit(None)
        events = [e for e in prof.key_averages() if e.device_time_total > 0 and e.device_type.name == "CUDA"]
        row["kernel_ms"] = round(sum(e.device_time_total for e in events) / 1000, 2)
        row["kernels"] = sum(e.count for e in events)
        events.sort(key=lambda e: -e.device_time_total)
        row["top_kernels"] = [{"kernel": e.key[:90], "ms": round(e.device_time_total / 1000, 3), "calls": e.count}
                              for e in events[:top]]
    batch.abandon()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None, help="preset or model directory (default: lite shape built in memory)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--fp8-experts", action="store_true", help="the runtime holds the routed experts in FP8")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--absorb-ab", type=int, nargs="*", metavar="PROMPT_TOKENS",
                   help="instead: graph ms/step with DeepSeek-V2's attention absorbed vs expanded "
                        "(dsft/runtime/mla_decode.py) for each size and each of these prompt lengths")
    p.add_argument("--ops", type=int, default=0, metavar="N",
                   help="also print the eager step's N aten ops with the most GPU time, by input shapes")
    p.add_argument("--host-profile", type=int, default=0, metavar="STEPS",
                   help="also cProfile STEPS graph decode steps of 1 row and print where the host's time goes")
    p.add_argument("--admit", type=int, nargs="*", metavar="PROMPT_TOKENS",
                   help="instead: where the time of each size's rows joining an empty batch goes (their first token), "
                        "for each of these prompt lengths; prints one JSON line each")
    p.add_argument("--repeats", type=int, default=5, help="timed admissions per --admit setting (the median is kept)")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    from runtime_bench import DOMAINS, bench_base, throwaway_registry

    from dsft.runtime.base import RuntimeBase
    from dsft.testing.adapters import make_adapter

    _, reg = throwaway_registry("dsft-decode-profile-")
    loaded = bench_base(a.base, a.device)
    refs = [make_adapter(loaded, d, seed=i, r=16, alpha=32, b_std=0.01, registry=reg).ref for i, d in enumerate(DOMAINS)]
    runtime = RuntimeBase(loaded, registry=reg, fp8_experts=a.fp8_experts)
    for ref in refs:
        runtime.attach(ref)
    vocab = len(loaded.tokenizer)
    if a.absorb_ab:
        return absorb_ab(runtime, refs, a, vocab, loaded.ref.name)
    if a.admit:
        for prompt in a.admit:
            for n in a.sizes:
                print(json.dumps(admission(runtime, refs, n, prompt, a.device, a.repeats, a.top)), flush=True)
        return None
    results = []
    for n in a.sizes:
        row: dict = {"rows": n}
        for graphs in ((True, False) if a.device.startswith("cuda") else (False,)):
            ms, batch = steps_ms(runtime, refs, n, a.steps, graphs, a.device, vocab)
            tag = "graph" if graphs else "eager"
            row[f"{tag}_ms_per_step"] = round(ms, 2)
            row[f"{tag}_tokens_per_s"] = round(n / ms * 1000, 1)
            if a.device.startswith("cuda"):
                total, count, top = kernels(runtime, batch, a.device, a.top)
                row[f"{tag}_kernel_ms_per_step"] = round(total, 2)
                row[f"{tag}_kernels_per_step"] = count
                row[f"{tag}_top_kernels"] = top
                if a.ops and not graphs:
                    row["eager_top_ops"] = op_profile(runtime, batch, a.device, a.ops)
                    for o in row["eager_top_ops"]:
                        print(f"  {n} rows | {o['op']} | {o['ms_per_step']} ms | {o['calls_per_step']} calls | {o['shapes']}")
            if graphs:
                row["captures"] = batch.slots.captures if batch.slots else 0
                row["graph_error"] = batch.slots.graph_error if batch.slots else None
                row["kv_cache_gib"] = round(batch.slots.cache.nbytes() / 2**30, 3) if batch.slots else 0
            batch.abandon()
        if a.device.startswith("cuda"):  # the same graphs, each step's tokens read before the next is launched
            ms, batch = steps_ms(runtime, refs, n, a.steps, True, a.device, vocab, overlap=False)
            row["graph_read_each_step_ms_per_step"] = round(ms, 2)
            batch.abandon()
        print(json.dumps({k: v for k, v in row.items() if not k.endswith(("top_kernels", "top_ops"))}), flush=True)
        results.append(row)
    if a.host_profile:
        host_profile(runtime, refs, a.host_profile, a.device)
    device_name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    out = Path(a.out) / f"{date.today()}-{device_name.replace(' ', '-')}-decode-profile{'-fp8-experts' if a.fp8_experts else ''}"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": device_name, "torch": torch.__version__, "base": loaded.ref.name, "adapters": len(refs),
            "steps": a.steps}
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "sizes": results}, indent=2) + "\n")
    lines = [f"# Decode steps on {device_name}: {loaded.ref.name}, 4 adapters mixed ({date.today()})", "",
             "Graph steps are launched before the previous step's tokens are read (overlap, as the runtime does on a "
             "GPU); 'read each step' is the same graphs without it.", "",
             "| rows | graph ms/step | graph tokens/s | read each step ms/step | GPU kernel ms/step (graph) | kernels/step "
             "| eager ms/step | eager tokens/s | GPU kernel ms/step (eager) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['rows']} | {r.get('graph_ms_per_step', '')} | {r.get('graph_tokens_per_s', '')} | "
                     f"{r.get('graph_read_each_step_ms_per_step', '')} | "
                     f"{r.get('graph_kernel_ms_per_step', '')} | {r.get('graph_kernels_per_step', '')} | {r.get('eager_ms_per_step', '')} | "
                     f"{r.get('eager_tokens_per_s', '')} | {r.get('eager_kernel_ms_per_step', '')} |")
    for r in results:
        if r.get("graph_top_kernels"):
            lines += ["", f"Top kernels of a graph step, {r['rows']} rows:", "", "| kernel | ms/step | calls/step |", "|---|---|---|"]
            lines += [f"| `{k['kernel']}` | {k['ms_per_step']} | {k['calls_per_step']} |" for k in r["graph_top_kernels"]]
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    reg.close()


if __name__ == "__main__":
    main()
