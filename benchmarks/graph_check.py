"""CUDA-graph decode vs eager decode on a GPU, in bf16 on the tiny presets: every adapter kind the runtime
serves (LoRA + terms, ESFT experts, the plain base) mixed in one batch, rows joining and leaving.

    python benchmarks/graph_check.py                  # a CUDA GPU, ~1 min
    python benchmarks/graph_check.py --device cpu     # smoke run: the graphs' bucketed inputs, eagerly
    python benchmarks/graph_check.py --absorbed       # the graphs with DeepSeek-V2's attention absorbed at every
                                                      # size (dsft/runtime/mla_decode.py; its Triton kernels on a
                                                      # GPU) vs eager steps through transformers' expanded attention

The CPU tests check the graphs' inputs (buckets of rows and width) eagerly and exactly (fp32); capturing and
replaying needs a GPU and half precision (graphs are off in fp32), so this runs there in bf16, where a
bucket's padded shapes may pick other GEMM kernels: each row's logits are compared step by step up to its
first differing token (after which the inputs differ), and must agree within bf16 noise (0.25 absolute;
the logits are O(10)). Prints one JSON line per preset and exits non-zero on a failure.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["The collateralized debt obligation desk reviewed its duration risk.", "The court granted habeas corpus because",
           "Patients with myocardial infarction were", "A short note about the museum"]


def run(runtime, asks, graphs: bool, device: str):
    """Drive one running batch: (adapter, prompt, new tokens, step it joins at) per ask; tokens and per-step logits."""
    from dsft.runtime import batching

    seen: dict[int, list[torch.Tensor]] = {}
    real = batching.sample

    def spy(logits, rows, widths=None):
        for i, row in enumerate(rows):
            seen.setdefault(id(row), []).append(logits[i].float().cpu())
        return real(logits, rows, widths)

    batching.sample = spy
    try:
        rows = [runtime.make_row(runtime.encode(p, a, raw=True), runtime.resolve(a), max_new_tokens=n, ignore_eos=True)
                for a, p, n, _ in asks]
        on_gpu = device.startswith("cuda")
        # On a CPU the graphs' bucketed inputs run eagerly, the prefill's too
        batch, step = runtime.batch(graphs=graphs and on_gpu, buckets=graphs and not on_gpu,
                                    prefill_graphs="buckets" if graphs and not on_gpu else None), 0
        while step <= max(j for *_, j in asks) or len(batch):
            runtime.step(batch, [r for r, (*_, j) in zip(rows, asks) if j == step])
            step += 1
        captures = batch.slots.captures if batch.slots else 0
        error = batch.slots.graph_error if batch.slots else None
        if batch.prefill is not None and graphs:  # on a GPU prefills are replayed too (unless DSFT_PREFILL_GRAPHS=0)
            captures += batch.prefill.captures
            error = error or batch.prefill.graph_error
            print(json.dumps({"prefill_graphs": batch.prefill.captures, "prefills": batch.prefill.prefills,
                              "prefill_graph_error": batch.prefill.graph_error}))
    finally:
        batching.sample = real
    return [r.tokens for r in rows], [seen[id(r)] for r in rows], captures, error


def main() -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--absorbed", action="store_true",
                   help="graph steps attend absorbed at every size, eager steps expanded: the absorbed path's numerics")
    args = p.parse_args()
    device = args.device
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DSFT_HOME", tempfile.mkdtemp(prefix="dsft-graph-check-"))
    from dsft.base import load_base as load_plain
    from dsft.registry import open_registry
    from dsft.runtime import mla_decode
    from dsft.runtime.base import RuntimeBase
    from dsft.testing.adapters import make_adapter, make_esft_adapter

    home = Path(tempfile.mkdtemp(prefix="dsft-graph-check-reg-"))
    reg = open_registry(f"sqlite:///{home / 'registry.db'}", adapters_root=home / "adapters")
    ok = True
    for preset in ("tiny-deepseek-v2", "tiny-qwen3-moe"):
        loaded = load_plain(preset, device=device, dtype=torch.bfloat16 if device.startswith("cuda") else torch.float32)
        refs = [make_adapter(loaded, d, seed=i + 1, registry=reg).ref for i, d in enumerate(["finance", "legal"])]
        if preset == "tiny-deepseek-v2":
            refs.append(make_esft_adapter(loaded, "esftdemo", seed=3, registry=reg).ref)
        runtime = RuntimeBase(loaded, registry=reg)
        for ref in refs:
            runtime.attach(ref)
        names = refs + [None]
        asks = [(names[i % len(names)], PROMPTS[i % 4] + " " * (i // 4), 6 + 5 * (i % 3), i // 2) for i in range(9)]
        default = (mla_decode.ABSORB_FROM, mla_decode.ABSORB_FROM_KERNELS)
        try:  # --absorbed: graphs absorbed at every size against eager steps through transformers' expanded attention
            mla_decode.ABSORB_FROM, mla_decode.ABSORB_FROM_KERNELS = (0, 0) if args.absorbed else default
            g_tokens, g_logits, captures, error = run(runtime, asks, True, device)
            mla_decode.ABSORB_FROM, mla_decode.ABSORB_FROM_KERNELS = (10**12, 10**12) if args.absorbed else default
            e_tokens, e_logits, _, _ = run(runtime, asks, False, device)
        finally:
            mla_decode.ABSORB_FROM, mla_decode.ABSORB_FROM_KERNELS = default
        diff, compared = 0.0, 0
        for gt, et, ga, ea in zip(g_tokens, e_tokens, g_logits, e_logits):
            upto = next((i for i, (x, y) in enumerate(zip(gt, et)) if x != y), len(gt))  # steps fed the same tokens
            for a, b in zip(ga[: upto + 1], ea[: upto + 1]):
                # both -inf (a column outside a row's vocabulary) is agreement; nan_to_num keeps any other gap large
                diff = max(diff, (a - b).nan_to_num(nan=0.0).abs().max().item())
                compared += 1
        same = sum(g == e for g, e in zip(g_tokens, e_tokens))
        good = error is None and (captures > 0 or device == "cpu") and diff <= 0.25 and same >= len(asks) // 2
        ok &= good
        print(json.dumps({"preset": preset, "absorbed_graphs": args.absorbed, "adapters": refs, "rows": len(asks), "rows_equal": same,
                          "steps_compared": compared, "max_logit_diff": diff,
                          "captures": captures, "graph_error": error, "ok": good}), flush=True)
        runtime.close()
    reg.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
