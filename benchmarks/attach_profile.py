"""Where an adapter attach spends its time: cProfile of ``RuntimeBase.attach`` for a lite-shape adapter.

    python benchmarks/attach_profile.py                 # H200: lite shape (random bf16 weights), ~1 min
    python benchmarks/attach_profile.py --base tiny-deepseek-v2 --device cpu   # smoke run

Three adapters (LoRA r16 on attention + shared + routed experts, ~900 MB of files each at the lite shape)
are written to a throwaway registry; the first attach builds the PEFT skeleton (and learns its key map),
the third is profiled. Prints the wall time of each attach with its parts, then the functions with the most
cumulative time. The parts (seconds, the device synchronized at each part's end):

    read       adapter_model.safetensors read into memory (hashing runs meanwhile, on threads)
    hash wait  verified(): waiting for the hash after the rest is done
    parse      safetensors' load(bytes) (terms.safetensors' small one included)
    load       the state dict into the skeleton (PEFT's load on a config's first attach, else the key map)
    extract    the factors taken out of the skeleton, cast to the base's dtype
    skeleton   the rest of reading the LoRA files: adapter_config.json, building (first attach) or
               allocating the skeleton's factors
    terms      terms.safetensors read, checked and moved to the device
    other      the rest of attach: registry lookups, the tokenizer copy, installing
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


class Parts:
    """Seconds spent in some functions of the attach path, per attach (see the module docstring)."""

    def __init__(self, device: str) -> None:
        self.seconds: dict[str, float] = {}
        self.cuda = device.startswith("cuda")

    def add(self, part: str, t0: float) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - t0

    def wrap(self, owner, attr: str, part: str, *, hashing: bool = False) -> None:
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            self.add(part, t0)
            if not hashing:
                return out
            data, verified = out

            def waited() -> None:
                t1 = time.perf_counter()
                try:
                    verified()
                finally:
                    self.add("hash wait", t1)
            return data, waited
        setattr(owner, attr, timed)

    def install(self) -> None:
        import safetensors.torch

        from dsft.runtime import weights

        self.wrap(weights, "read_hashing", "read", hashing=True)
        self.wrap(safetensors.torch, "load", "parse")
        self.wrap(weights, "_load_with_peft", "load")
        self.wrap(weights, "_load_mapped", "load")
        self.wrap(weights, "_extract", "extract")
        self.wrap(weights, "_read_lora", "lora")  # read_adapter minus this: terms

    def line(self, total: float) -> str:
        s = dict(self.seconds)
        adapter = s.pop("read_adapter", 0.0)
        lora = s.pop("lora", 0.0)
        s["skeleton"] = max(0.0, lora - sum(s.get(k, 0.0) for k in ("read", "hash wait", "parse", "load", "extract")))
        s["terms"] = adapter - lora
        s["other"] = total - adapter
        self.seconds = {}
        order = ("read", "hash wait", "parse", "load", "extract", "skeleton", "terms", "other")
        return "  ".join(f"{k} {s.get(k, 0.0):.3f}" for k in order)


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
    parts = Parts(a.device)
    parts.install()
    import dsft.runtime.base as runtime_base

    parts.wrap(runtime_base, "read_adapter", "read_adapter")
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
        total = time.perf_counter() - t0
        print(f"attach {ref}: {total:.3f} s  ({parts.line(total)})", flush=True)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(a.top)
    print(out.getvalue())
    reg.close()


if __name__ == "__main__":
    main()
