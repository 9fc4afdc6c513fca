"""Validate ``dsft plan`` against measured peak memory: one base, several methods x lengths, one process.

    python benchmarks/plan_validate.py                       # H100: deepseek-v2-lite-shape, 6 settings
    python benchmarks/plan_validate.py --base tiny-deepseek-v2 --device cpu --settings lora:2x256,lora:1x512

Each setting runs two real training steps (eager, as ``dsft plan --measure`` does) and compares the peak
(``torch.cuda.max_memory_allocated``) with the plan's peak allocated memory. Writes
``benchmarks/results/<date>-<device>-plan-validation.{json,md}``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = "lora:8x512:ckpt,lora:4x1024:ckpt,lora:4x2048:ckpt,lora:2x4096:ckpt,lora:1x8192:ckpt,lora:4x512,lora:2x1024"


def parse(spec: str) -> list[tuple[str, int, int, bool]]:
    out = []
    for item in spec.split(","):
        parts = item.split(":")
        b, s = parts[1].split("x")
        out.append((parts[0], int(b), int(s), len(parts) > 2 and parts[2] == "ckpt"))
    return out


def lite_loaded(base: str, device: str):
    """The base as ``load_base`` gives it; the lite shape is built straight on the GPU with random weights
    (writing its 31 GB preset to disk first would take minutes)."""
    from dsft.base import load_base
    from dsft.base.arch import spec_for
    from dsft.base.loading import BaseRef, LoadedBase

    if base != "deepseek-v2-lite-shape":
        return load_base(base, device=device)
    from benchmarks.train_throughput import build_model
    from dsft.base.tokenizer import train_bpe
    from dsft.domains import corpus_text_for_tokenizer

    model = build_model(27)
    model.gradient_checkpointing_disable()
    tok = train_bpe(corpus_text_for_tokenizer(seed=0), 4096)
    spec = spec_for(model.config.model_type, model.config.architectures)
    return LoadedBase(BaseRef(base, f"preset:{base}", Path(".")), model, tok, spec, {})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="deepseek-v2-lite-shape")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--settings", default=DEFAULT, help="method:BATCHxSEQ[:ckpt],...")
    a = ap.parse_args()

    from dsft.eval.plan import PlanRequest, count_model
    from dsft.eval.plan_measure import compare, prepare

    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    t0 = time.perf_counter()
    counts = count_model(a.base, dtype=dtype)
    settings = parse(a.settings)
    rows, prepared = [], {}
    loaded = lite_loaded(a.base, a.device)
    print(f"model ready in {time.perf_counter() - t0:.0f}s", flush=True)
    for method, batch, seq, ckpt in settings:
        req = PlanRequest(a.base, method, seq=seq, batch=batch, checkpointing=ckpt, device=a.device)
        if method not in prepared:
            if prepared:  # one method per process for the lite shape: the model carries the first one's layers
                rows.append({"method": method, "batch": batch, "seq": seq, "checkpointing": ckpt, "skipped": "one method per run"})
                continue
            prepared[method] = prepare(req, loaded)
        try:
            row = compare(req, counts, prepared[method])
        except torch.OutOfMemoryError:
            row = {"method": method, "batch": batch, "seq": seq, "checkpointing": ckpt, "oom": True}
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
    device = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    stem = f"{datetime.date.today()}-{device.replace(' ', '-')}-plan-validation"
    out = ROOT / "benchmarks" / "results"
    (out / f"{stem}.json").write_text(json.dumps({"base": a.base, "device": device, "rows": rows,
                                                   "torch": torch.__version__}, indent=2) + "\n")
    lines = [f"# `dsft plan` vs measured peak memory: {a.base} on {device}", "",
             "Two eager training steps per setting (`benchmarks/plan_validate.py`); measured = `torch.cuda.max_memory_allocated`,",
             "predicted = the plan's peak allocated memory (weights + trainable state + activations + loss/backward transient).", "",
             "| method | batch x seq | checkpointing | predicted GiB | measured GiB | error |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "predicted_gib" in r:
            lines.append(f"| {r['method']} | {r['batch']} x {r['seq']} | {'yes' if r['checkpointing'] else 'no'} | "
                         f"{r['predicted_gib']:.2f} | {r['measured_gib']:.2f} | {r['error']:+.1%} |")
        else:
            lines.append(f"| {r['method']} | {r['batch']} x {r['seq']} | {'yes' if r['checkpointing'] else 'no'} | | "
                         f"{'out of memory' if r.get('oom') else r.get('skipped', '')} | |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
