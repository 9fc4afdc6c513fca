"""The decode-size grouped GEMM: dsft's Triton kernel (dsft/kernels/moe_gemm.py) vs torch's grouped GEMM.

    python benchmarks/moe_gemm_bench.py            # a CUDA GPU, ~1-2 min (compiles each configuration once)
    python benchmarks/moe_gemm_bench.py --block    # the whole routed-experts block: six kernels vs torch's glue
    python benchmarks/moe_gemm_bench.py --block --glu-warps 4 8   # ... and its SwiGLU kernels at 4 and 8 warps
    python benchmarks/moe_gemm_bench.py --fp8      # the experts' own weights in FP8 (--fp8-experts), tiles swept
    python benchmarks/moe_gemm_bench.py --prefill 64 170 512 1024   # FP8 experts at prefill sizes: widened or in place

DeepSeek-V2-Lite's routed experts as the runtime runs them: gate_up ``[64, 2816 + 64, 2048]`` and down
``[64, 2048 + 64, 1408]`` (each expert's stacked LoRA A rows of four r16 adapters under its W rows), pairs of
1, 8, 32 and 128 decode rows routed top-6 at random. Each variant is timed as 20 calls captured in a CUDA
graph (kernel time and the gaps a graph replay has, no Python launch cost), and checked against torch's
result. Writes benchmarks/results/<date>-<gpu>-moe-gemm.json and .md.

``--block`` times the runtime's whole routed-experts forward of a mixed batch (``experts_forward_mixed``: four r16
adapters, each row its own, A under W) in its six Triton kernels against the same with torch's glue around the
Triton GEMMs (the path before them), and reports their largest difference relative to the output's largest
value (bf16 rounds differently: the kernels sum in fp32). Writes ``-moe-block.json`` and ``.md``.

``--fp8`` sweeps the tiles for the experts' own weights (no A rows) held in FP8 with row scales, as
``dsft serve --fp8-experts`` holds them (half the bytes: K blocks up to 512), against torch's grouped GEMM on the
weights they stand for in bf16. Writes ``-moe-gemm-fp8.json`` and ``.md``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {"gate_up": (2816 + 64, 2048), "down": (2048 + 64, 1408),
          # the LoRA up-projections of four r16 adapters stacked (K = 64): B [E, out, 64]
          "gate_up B": (2816, 64), "down B": (2048, 64)}
E, TOP_K = 64, 6


def graph_us(fn, calls: int = 20, replays: int = 10) -> float:
    """Microseconds a call, from ``calls`` calls captured in one CUDA graph and replayed."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (calls * replays)


def save(out_dir: str, name: str, results: list[dict], table: Callable[[str], list[str]]) -> None:
    """``<date>-<gpu>-<name>.json`` (the rows as measured) and ``.md`` (``table(gpu name)``'s lines), printed too."""
    device = torch.cuda.get_device_name()
    out = Path(out_dir) / f"{date.today()}-{device.replace(' ', '-')}-{name}"
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{out}.json").write_text(json.dumps({"device": device, "torch": torch.__version__, "results": results}, indent=2) + "\n")
    lines = table(device)
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def pairs_for(rows: int, g: torch.Generator) -> tuple[torch.Tensor, int]:
    """Run ends of ``rows`` tokens' top-6 experts sorted by expert, and the number of experts used."""
    experts = torch.stack([torch.randperm(E, generator=g)[:TOP_K] for _ in range(rows)]).reshape(-1)
    counts = torch.bincount(experts, minlength=E)
    return counts.cumsum(0).to(torch.int32).cuda(), int((counts > 0).sum())


def block(rows_list: list[int], out_dir: str, glu_warps: list[int] | None = None) -> None:
    """The routed-experts block of a mixed decode step: six kernels vs torch's glue (see the module's docstring);
    with ``glu_warps``, the six kernels once per warp count of the SwiGLU variants (:data:`moe_gemm.GLU_WARPS`)."""
    from transformers.activations import ACT2FN

    from dsft.kernels import moe_gemm
    from dsft.kernels.expert_lora import LowRank
    from dsft.runtime import mixed_experts
    from dsft.runtime.fused_linear import FusedWeights
    from dsft.runtime.row_groups import RowGroups, stack_experts

    g = torch.Generator(device="cuda").manual_seed(0)
    H, I, r, n_adapters = 2048, 1408, 16, 4
    module = torch.nn.Module()
    module.gate_up_proj = torch.nn.Parameter(torch.randn(E, 2 * I, H, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02)
    module.down_proj = torch.nn.Parameter(torch.randn(E, H, I, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02)

    def lowrank(out: int, inp: int) -> LowRank:
        return LowRank(torch.randn(E, r, inp, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02,
                       torch.randn(E, out, r, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02, 2.0)
    gu = stack_experts([lowrank(2 * I, H) for _ in range(n_adapters)])
    dn = stack_experts([lowrank(H, I) for _ in range(n_adapters)])
    buffers = FusedWeights()
    fused = (buffers.get("e", module, gu.A, 1, "gate_up_proj"), buffers.get("e", module, dn.A, 1, "down_proj"))
    act, silu = ACT2FN["silu"], mixed_experts.is_silu
    results = []
    for rows in rows_list:
        groups = RowGroups.of([f"a{i % n_adapters}" for i in range(rows)], "cuda")
        mask = groups.column_mask(tuple(range(n_adapters)), (r,) * n_adapters, rows, torch.bfloat16)
        x = torch.randn(rows, H, device="cuda", dtype=torch.bfloat16, generator=g)
        index = torch.stack([torch.randperm(E, device="cuda", generator=g)[:TOP_K] for _ in range(rows)])
        weights = torch.rand(rows, TOP_K, device="cuda", generator=g).softmax(-1)

        def forward():
            return mixed_experts.experts_forward_mixed(x, index, weights, module.gate_up_proj.detach(), module.down_proj.detach(),
                                                       act, (gu, mask), (dn, mask), fused=fused)
        new = forward()
        new_us = graph_us(forward)
        by_warps = {}
        for warps in glu_warps or []:
            default, moe_gemm.GLU_WARPS = moe_gemm.GLU_WARPS, warps
            try:
                other = forward()
                by_warps[f"kernels_glu_warps{warps}_us"] = round(graph_us(forward), 1)
                by_warps[f"glu_warps{warps}_max_rel_diff"] = float((other.float() - new.float()).abs().max()
                                                                   / new.float().abs().max())
            finally:
                moe_gemm.GLU_WARPS = default
        mixed_experts.is_silu = lambda act: False  # the path before the six kernels: torch's glue
        try:
            old = forward()
            old_us = graph_us(forward)
        finally:
            mixed_experts.is_silu = silu
        row = {"rows": rows, "torch_glue_us": round(old_us, 1), "kernels_us": round(new_us, 1), **by_warps,
               "speedup": round(old_us / new_us, 2),
               "max_rel_diff": float((new.float() - old.float()).abs().max() / old.float().abs().max())}
        print(json.dumps(row), flush=True)
        results.append(row)
    def table(device: str) -> list[str]:
        lines = [f"# The routed-experts block of a mixed decode step on {device} ({date.today()})", "",
                 "DeepSeek-V2-Lite's experts, four r16 adapters (each row its own, A under W), top-6 at random; "
                 "20 calls in a CUDA graph.", "",
                 "| rows | torch's glue + Triton GEMMs us | six Triton kernels us | speed-up | max diff / max |", "|---|---|---|---|---|"]
        lines += [f"| {r['rows']} | {r['torch_glue_us']} | {r['kernels_us']} | {r['speedup']}x | {r['max_rel_diff']:.1e} |"
                  for r in results]
        return lines
    save(out_dir, "moe-block", results, table)


def prefill(tokens_list: list[int], out_dir: str) -> None:
    """FP8 experts at prefill sizes: the runtime's path today (the layer's experts widened to bf16 in one Triton pass,
    then torch's grouped GEMM) against the Triton kernel reading the e4m3 weights in place (what
    ``DSFT_FP8_INPLACE_PAIRS`` turns on), tiles swept; torch's grouped GEMM on bf16 weights (the bf16 runtime) beside
    them. Writes ``-moe-gemm-fp8-prefill.json`` and ``.md``."""
    from dsft.kernels.fp8 import dequantize, quantize_rows
    from dsft.kernels.grouped_mm import grouped_mm_kernel
    from dsft.kernels.moe_gemm import config, moe_gemm

    g = torch.Generator().manual_seed(0)
    configs = [dict(block_m=bm, block_n=bn, block_k=bk, num_warps=nw, num_stages=3)
               for bm, bn, bk, nw in itertools.product((16, 32, 64, 128), (64, 128), (64, 128), (4, 8))
               if not (bm == 128 and bn == 128 and nw == 4)]
    results = []
    for name, (n, k) in {"gate_up": (2816, 2048), "down": (2048, 1408)}.items():
        bf16 = torch.randn(E, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        q = quantize_rows(bf16)
        w8, scale = q.q.transpose(1, 2), q.scale
        for tokens in tokens_list:
            offs, used = pairs_for(tokens, g)
            x = torch.randn(tokens * TOP_K, k, device="cuda", dtype=torch.bfloat16)
            want = grouped_mm_kernel(x, dequantize(q.q, q.scale, torch.bfloat16).transpose(1, 2), offs)
            row = {"shape": name, "tokens": tokens, "pairs": tokens * TOP_K, "experts_used": used,
                   "widen_then_torch_us": round(graph_us(lambda: grouped_mm_kernel(
                       x, dequantize(q.q, q.scale, torch.bfloat16).transpose(1, 2), offs)), 1),
                   "torch_bf16_weights_us": round(graph_us(lambda: grouped_mm_kernel(x, bf16.transpose(1, 2), offs)), 1)}
            default = config(k, fp8=True, pairs=tokens * TOP_K)
            best = None
            for cfg in configs:
                try:
                    got = moe_gemm(x, w8, offs, scale=scale, **cfg)
                    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                    us = graph_us(lambda cfg=cfg: moe_gemm(x, w8, offs, scale=scale, **cfg), calls=5, replays=5)
                except Exception as exc:  # a configuration the compiler refuses (shared memory, registers)
                    print(f"{name} tokens={tokens} {cfg}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
                    continue
                if best is None or us < best[0]:
                    best = (us, cfg, err)
                if all(cfg[key] == default[key] for key in cfg if key in default):
                    row["in_place_default_us"] = round(us, 1)
            assert best is not None
            row.update(in_place_best_us=round(best[0], 1), best=best[1], rel_err=best[2],
                       speedup_vs_widen=round(row["widen_then_torch_us"] / best[0], 2))
            print(json.dumps(row), flush=True)
            results.append(row)
    def table(device: str) -> list[str]:
        lines = [f"# FP8 experts at prefill sizes on {device} ({date.today()})", "",
                 "Lite-shape routed experts (64, top-6 at random), one projection; us a call (CUDA graph). Widen + torch: the "
                 "runtime's FP8 prefill (one Triton pass to bf16, torch's grouped GEMM); in place: dsft's kernel on the e4m3 "
                 "weights (DSFT_FP8_INPLACE_PAIRS), best of the tiles swept; torch bf16: the bf16 runtime's GEMM.", "",
                 "| shape | tokens | pairs | widen + torch us | in place, default tiles us | in place, best us | best tiles | x widen | torch bf16 us |",
                 "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['tokens']} | {r['pairs']} | {r['widen_then_torch_us']} | {r.get('in_place_default_us', '')} | "
                  f"{r['in_place_best_us']} | {r['best']} | {r['speedup_vs_widen']} | {r['torch_bf16_weights_us']} |" for r in results]
        return lines
    save(out_dir, "moe-gemm-fp8-prefill", results, table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128])
    p.add_argument("--block", action="store_true", help="time the whole routed-experts block instead")
    p.add_argument("--glu-warps", type=int, nargs="*", help="with --block: also time it with the SwiGLU kernels at these warps")
    p.add_argument("--fp8", action="store_true", help="the experts' weights in FP8 with row scales (see the docstring)")
    p.add_argument("--prefill", type=int, nargs="*", metavar="TOKENS",
                   help="instead: FP8 experts at these prefill sizes, widened vs read in place (see prefill())")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    if a.block:
        return block(a.rows, a.out, a.glu_warps)
    if a.prefill:
        return prefill(a.prefill, a.out)
    from dsft.kernels.fp8 import dequantize, quantize_rows
    from dsft.kernels.grouped_mm import grouped_mm_kernel
    from dsft.kernels.moe_gemm import config, moe_gemm

    def configs_for(k: int) -> list[dict]:
        if a.fp8:
            return [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                    for bn, bk, nw, ns in itertools.product((32, 64, 128), (128, 256, 512), (4, 8), (3, 4))
                    if not (bn == 32 and nw == 8) and not (bn == 128 and bk == 512)]
        if k <= 64:
            return [dict(block_n=bn, block_k=max(16, k), num_warps=nw, num_stages=ns)
                    for bn, nw, ns in itertools.product((64, 128, 256), (4, 8), (1, 2))]
        return [dict(block_n=bn, block_k=bk, num_warps=nw, num_stages=ns)
                for bn, bk, nw, ns in itertools.product((32, 64, 128), (64, 128, 256), (4, 8), (3, 4))
                if not (bn == 32 and nw == 8)]
    g = torch.Generator().manual_seed(0)
    results = []
    shapes = {"gate_up": (2816, 2048), "down": (2048, 1408)} if a.fp8 else SHAPES
    for name, (n, k) in shapes.items():
        stacked = torch.randn(E, n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        w = stacked.transpose(1, 2)  # [E, K, N]: how the runtime passes a [W; A] buffer
        scale = None
        if a.fp8:
            q = quantize_rows(stacked)
            w, scale, stacked = q.q.transpose(1, 2), q.scale, dequantize(q.q, q.scale, torch.bfloat16)
        for rows in a.rows:
            offs, used = pairs_for(rows, g)
            x = torch.randn(rows * TOP_K, k, device="cuda", dtype=torch.bfloat16)
            want = grouped_mm_kernel(x, stacked.transpose(1, 2), offs)
            weight_bytes = used * n * k * w.element_size()
            row = {"shape": name, "rows": rows, "pairs": rows * TOP_K, "experts_used": used,
                   "torch_us": round(graph_us(lambda: grouped_mm_kernel(x, stacked.transpose(1, 2), offs)), 2)}
            best = None
            default = config(k, fp8=w.dtype == torch.float8_e4m3fn, pairs=rows * TOP_K)
            for cfg in configs_for(k):
                try:
                    got = moe_gemm(x, w, offs, scale=scale, **cfg)
                    err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
                    us = graph_us(lambda cfg=cfg: moe_gemm(x, w, offs, scale=scale, **cfg))
                except Exception as exc:  # a configuration the compiler refuses (shared memory)
                    print(f"{name} rows={rows} {cfg}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
                    continue
                if best is None or us < best[0]:
                    best = (us, cfg, err)
                if cfg == {key: v for key, v in default.items() if key != "block_m"}:  # the sweep keeps 16-row blocks
                    row["default_us"], row["default_rel_err"] = round(us, 2), err
            assert best is not None
            row.update(best_us=round(best[0], 2), best=best[1], best_rel_err=best[2],
                       torch_tb_s=round(used * n * k * 2 / row["torch_us"] / 1e6, 2),  # (bf16 weights)
                       best_tb_s=round(weight_bytes / best[0] / 1e6, 2))
            print(json.dumps(row), flush=True)
            results.append(row)
    def table(device: str) -> list[str]:
        lines = [f"# Decode-size grouped GEMM on {device} ({date.today()})", "",
                 "20 calls in a CUDA graph; TB/s = the used experts' weight bytes / time"
                 + (" (Triton: FP8 weights with row scales; torch: the same weights in bf16)." if a.fp8 else "."), "",
                 "| shape | rows | pairs | experts used | torch us (TB/s) | Triton, moe_gemm's config us | Triton best us (TB/s) | best config | rel. err |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            lines.append(f"| {r['shape']} | {r['rows']} | {r['pairs']} | {r['experts_used']} | {r['torch_us']} ({r['torch_tb_s']}) | "
                         f"{r.get('default_us', '')} | {r['best_us']} ({r['best_tb_s']}) | {r['best']} | {r['best_rel_err']:.1e} |")
        return lines
    save(a.out, "moe-gemm-fp8" if a.fp8 else "moe-gemm", results, table)


if __name__ == "__main__":
    main()
