"""Where an adapter attach spends its time: cProfile of ``RuntimeBase.attach`` for a lite-shape adapter.

    python benchmarks/attach_profile.py                 # H200: lite shape (random bf16 weights), ~1 min
    python benchmarks/attach_profile.py --base tiny-deepseek-v2 --device cpu   # smoke run

Three adapters (LoRA r16 on attention + shared + routed experts, ~900 MB of files each at the lite shape)
are written to a throwaway registry; the first attach builds the PEFT skeleton, the third is profiled.
Prints the wall time of each attach and the functions with the most cumulative time.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--top", type=int, default=30)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from runtime_bench import DOMAINS, bench_base, throwaway_registry

    from dsft.runtime.base import RuntimeBase
    from dsft.testing.adapters import make_adapter

    _, reg = throwaway_registry("dsft-attach-profile-")
    loaded = bench_base(a.base, a.device)
    refs = [make_adapter(loaded, d, seed=i, r=16, alpha=32, b_std=0.01, registry=reg).ref for i, d in enumerate(DOMAINS[:3])]
    runtime = RuntimeBase(loaded, registry=reg)
    for i, ref in enumerate(refs):
        prof = cProfile.Profile() if i == len(refs) - 1 else None
        t0 = time.perf_counter()
        if prof:
            prof.enable()
        runtime.attach(ref)
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        if prof:
            prof.disable()
        print(f"attach {ref}: {time.perf_counter() - t0:.3f} s", flush=True)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(a.top)
    print(out.getvalue())
    reg.close()


if __name__ == "__main__":
    main()
