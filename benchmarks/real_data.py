"""Training on SFT-like data from the CLI: packed throughput, padding, compiles; tokenising time and memory.

    python benchmarks/real_data.py                                   # one H200: DeepSeek-V2-Lite shape, 1 GB JSONL
    python benchmarks/real_data.py --base tiny-deepseek-v2 --small   # CPU smoke check (a minute)
    DSFT_CUDA_GRAPHS=0 python benchmarks/real_data.py ...            # the training steps without CUDA graphs

1. Writes variable-length instruction records as JSONL: response lengths lognormal (median ~300 tokens,
   a long tail cut at 4,096), prompts a quarter of that, words drawn from a fixed vocabulary (seeded).
2. Runs ``dsft train --base BASE --data that.jsonl --max-steps N --json`` and reads, per stage, the
   non-padding tokens/s, the padding share of the packed rows, and the torch.compile recompiles
   (``TORCH_LOGS=recompiles``; 0 means each layer compiled once).
3. Tokenises a large JSONL (``--tokenize-gb``, default 1 GB) in a fresh process, streaming it into
   the Arrow cache (:mod:`dsft.data.token_cache`), and reports the time, the time of a second call
   (a cache hit) and the peak RSS.

Prints one JSON line and one markdown table row.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("asset liability equity revenue margin coupon yield duration hedge swap option futures basis spread ledger "
         "accrual audit covenant dividend leverage liquidity collateral tranche default rating maturity principal "
         "interest inflation payroll invoice budget forecast variance capital reserve escrow custody clearing").split()


def write_jsonl(path: Path, target_bytes: int, seed: int = 0, max_tokens: int = 4096) -> int:
    """Instruction records until the file holds ``target_bytes``; returns the record count."""
    rng = random.Random(seed)
    n = 0
    with path.open("w") as f:
        while f.tell() < target_bytes:
            response = min(max_tokens, max(4, int(rng.lognormvariate(math.log(300), 0.9))))
            prompt = max(4, response // 4)
            rec = {"prompt": " ".join(rng.choices(WORDS, k=prompt)), "response": " ".join(rng.choices(WORDS, k=response))}
            f.write(json.dumps(rec) + "\n")
            n += 1
    return n


def run_train(a, data: Path, home: str) -> dict:
    cmd = [sys.executable, "-m", "dsft.cli", "train", "--base", a.base, "--data", str(data), "--max-steps",
           str(a.steps), "--json", "--checkpoint-every", "0"]
    if a.device:
        cmd += ["--device", a.device]
    if a.qlora:
        cmd += ["--qlora"]
    cmd += ["--keep-layers", a.keep_layers] if a.keep_layers else []
    cmd += [f"--{'' if a.recompute_attention == 'on' else 'no-'}recompute-attention"] if a.recompute_attention else []
    cmd += a.override or []  # recipe overrides, e.g. stages.0.seq_len=4096 stages.0.batch_size=2
    env = {**os.environ, "DSFT_HOME": home, "TORCH_LOGS": "recompiles", "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"dsft train failed ({p.returncode}):\n{p.stderr[-4000:]}")
    result = json.loads(p.stdout[p.stdout.index("{"):])
    stages = []
    for s in result["metrics"]["stages"]:
        data_plan = s.get("data", {})
        stages.append({"stage": s["stage"], "steps": s["steps"], "tokens_per_s": s["tokens_per_s"],
                       "padded_tokens_per_s": s["padded_tokens_per_s"], "padding_share": data_plan.get("padding_share"),
                       "seq_len": data_plan.get("seq_len"), "batch_size": data_plan.get("batch_size"),
                       "micro_batch_size": data_plan.get("micro_batch_size"), "attention": s.get("attention"),
                       "peak_gpu_gib": s.get("peak_gpu_gib"), "cuda_graphs": s.get("cuda_graphs"),
                       "recompute": s.get("recompute")})
    # The stage figures above include the compile warm-up of the first step; the steady rate is the median of
    # the per-step rates in the adapter's training log after the first two steps.
    log = Path(result["path"]) / "train_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    for st in stages:
        rates = sorted(r["tokens_per_s"] for r in rows if r.get("stage") == st["stage"] and r.get("step", 0) > 2)
        st["steady_tokens_per_s"] = round(rates[len(rates) // 2], 1) if rates else None
        # held-out losses during the stage (the recipe's eval_every), from the same log
        st["heldout"] = [{"step": r.get("step"), **r["heldout"]} for r in rows if r.get("stage") == st["stage"] and "heldout" in r]
    return {"stages": stages, "recompiles": p.stderr.count("Recompiling function"), "recompile_reasons": recompile_reasons(p.stderr),
            "seconds": round(time.perf_counter() - t0, 1)}


def recompile_reasons(log: str) -> dict[str, int]:
    """``TORCH_LOGS=recompiles`` output as {function and first failed guard: times}."""
    lines, reasons = log.splitlines(), {}
    for i, line in enumerate(lines):
        if "Recompiling function" in line:
            where = line.split("Recompiling function", 1)[1].strip()
            guard = next((g.split("- ", 1)[-1].strip() for g in lines[i + 1 : i + 4] if "- " in g and "triggered" not in g), "")
            key = f"{where.split(' in ')[0]} @ {where.rsplit('/', 1)[-1]}: {guard[:160]}"
            reasons[key] = reasons.get(key, 0) + 1
    return reasons


TOKENIZE = """
import json, os, resource, sys, tempfile, time
from pathlib import Path
from transformers import AutoTokenizer
from dsft.data.files import Record
from dsft.data.token_cache import tokenized

class Jsonl:  # streams the file: memory holds one batch of examples, never the corpus
    def __init__(self, path):
        self.path = path
    def records(self):
        with open(self.path) as f:
            for n, line in enumerate(f, 1):
                r = json.loads(line)
                yield Record.instruction(r["prompt"], r["response"], source=f"{self.path}:{n}")
    def fingerprint(self):
        st = os.stat(self.path)
        return f"{self.path}:{st.st_size}:{st.st_mtime_ns}"

tok = AutoTokenizer.from_pretrained(sys.argv[1])
cache = Path(tempfile.mkdtemp())
t0 = time.perf_counter()
seqs = tokenized(Jsonl(sys.argv[2]), tok, int(sys.argv[3]), cache)
first = time.perf_counter() - t0
t0 = time.perf_counter()
tokenized(Jsonl(sys.argv[2]), tok, int(sys.argv[3]), cache)
print(json.dumps({"seconds": first, "cached_seconds": time.perf_counter() - t0,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "examples": len(seqs), "tokens": int(seqs.lengths.sum())}))
"""


def run_tokenize(a, path: Path, home: str) -> dict:
    from dsft.base.presets import build_preset

    os.environ["DSFT_HOME"] = home
    base_dir = build_preset(a.base) if not Path(a.base).exists() else Path(a.base)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    p = subprocess.run([sys.executable, "-c", TOKENIZE, str(base_dir), str(path), str(a.seq_len)],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        sys.exit(f"tokenising failed:\n{p.stderr[-4000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="deepseek-v2-lite-shape")
    ap.add_argument("--small", action="store_true", help="CPU smoke check: small files, few steps")
    ap.add_argument("--steps", type=int, default=None, help="--max-steps for dsft train (default 30; 2 with --small)")
    ap.add_argument("--train-mb", type=float, default=None, help="size of the training JSONL (default 20 MB; 0.2 with --small)")
    ap.add_argument("--tokenize-gb", type=float, default=None, help="size of the JSONL tokenised alone (default 1; 0.002 with --small)")
    ap.add_argument("--tokenize-only", action="store_true", help="only the tokenising measurement (no dsft train)")
    ap.add_argument("--seq-len", type=int, default=4096, help="seq_len for the tokenising measurement")
    ap.add_argument("--device", default=None)
    ap.add_argument("--qlora", action="store_true", help="dsft train --qlora (the base in NF4)")
    ap.add_argument("--keep-layers", default=None, help="dsft train --keep-layers (default: dsft train's own, auto)")
    ap.add_argument("--recompute-attention", choices=("on", "off"), help="dsft train --recompute-attention or "
                    "--no-recompute-attention (default: its own choice)")
    ap.add_argument("--override", action="append", help="a recipe override for dsft train (repeatable), e.g. stages.0.seq_len=4096")
    ap.add_argument("--home", default=None, help="DSFT_HOME (default: a temporary one; presets are built there)")
    a = ap.parse_args()
    a.steps = a.steps or (2 if a.small else 30)
    train_mb = a.train_mb if a.train_mb is not None else (0.2 if a.small else 20)
    tok_gb = a.tokenize_gb if a.tokenize_gb is not None else (0.002 if a.small else 1.0)
    sys.path.insert(0, str(ROOT))
    home = a.home or tempfile.mkdtemp(prefix="dsft-real-data-")
    with tempfile.TemporaryDirectory() as tmp:
        train_file, big_file = Path(tmp) / "sft.jsonl", Path(tmp) / "big.jsonl"
        n_train = 0 if a.tokenize_only else write_jsonl(train_file, int(train_mb * 2**20), seed=0)
        train = {"stages": [], "recompiles": 0, "seconds": 0.0} if a.tokenize_only else run_train(a, train_file, home)
        print(json.dumps({"train": train}), flush=True)  # before the tokenising run, which may take long
        tok, n_big = None, 0
        if tok_gb > 0:
            n_big = write_jsonl(big_file, int(tok_gb * 2**30), seed=1)
            tok = run_tokenize(a, big_file, home)
    tokenize = {"gb": tok_gb, "records": n_big, **{k: round(v, 1) for k, v in tok.items()}} if tok else None
    out = {"benchmark": "real_data", "date": str(date.today()), "base": a.base, "steps": a.steps, "train_records": n_train,
           **train, "tokenize": tokenize}
    print(json.dumps(out))
    tok_text = (f"tokenise {tok_gb} GB: {tok['seconds']:.0f} s (cached {tok['cached_seconds']:.1f} s), peak RSS {tok['peak_rss_mib']:,.0f} MiB"
                if tok else "not tokenised")
    for st in train["stages"]:
        print(f"| {a.base} | {st['stage']} | {st['batch_size']} x {st['seq_len']} | {st['tokens_per_s']:,.0f} tok/s (steady {st['steady_tokens_per_s'] or 0:,.0f}) "
              f"| padding {100 * (st['padding_share'] or 0):.1f}% | recompiles {train['recompiles']} | {tok_text} |")
    if not train["stages"]:
        print(f"| {a.base} | {tok_text} |")

if __name__ == "__main__":
    main()
