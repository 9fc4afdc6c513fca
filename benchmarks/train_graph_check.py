"""Training steps as CUDA graphs vs eager steps on a GPU, through the loop ``dsft train`` runs (``train_steps``).

    python benchmarks/train_graph_check.py                 # a CUDA GPU, ~1 min: DeepSeek-V2-Lite shape, 2 layers
    python benchmarks/train_graph_check.py --layers 4 --micro-batch 1
    python benchmarks/train_graph_check.py --attn dsft_varlen    # variable-length attention, against flex's losses

Three runs from the same weights on the same packed rows (flex attention, compiled layers, activation
checkpointing, the router probe, fused AdamW): eager steps (no graphs); graphs (each shape warmed up, captured,
replayed); and a capture that fails inside an activation checkpoint (a hook on the final norm runs a checkpointed
function that syncs while a graph records, as a user's code might), after which the stage must go on eagerly - on torch < 2.12 a checkpoint whose function
raised stays half-entered until the exception is gone, which broke the first fallback on an H200. Every run must
give the eager run's losses (bf16: the same kernels in the same order, so equal up to atomics' order).
Prints one JSON line; exits non-zero on a failure. The CPU tests check the bookkeeping with an emulated capture
(``tests/recipes/test_graphs.py``); capturing needs a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.train_throughput import compile_layers, packed_batch, prepare, with_seq_lens  # noqa: E402
from dsft.base.arch import ARCHITECTURES  # noqa: E402
from dsft.base.router import RouterProbe  # noqa: E402
from dsft.kernels.varlen import VARLEN, register  # noqa: E402
from dsft.recipes.graphs import StepGraphs, no_mask_built, recorded_alike  # noqa: E402
from dsft.recipes.loop import train_steps  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--micro-batch", type=int, default=None, help="rows per forward (micro-batches of one shape)")
    p.add_argument("--attn", default="flex_attention", choices=["flex_attention", VARLEN],
                   help=f"{VARLEN}: also the eager run with flex attention, whose losses it must give")
    a = p.parse_args()
    model, layers, trainable = prepare("dsft_lora", a.layers, 16)
    base = model.get_base_model()
    base.set_attn_implementation("flex_attention")
    compile_layers(layers)
    batch = packed_batch(a.rows, a.seq)
    alike = recorded_alike
    if a.attn == VARLEN:  # as dsft train runs it: the examples' lengths with the batch, graphs for every batch
        register()
        batch = with_seq_lens(batch)
        alike = no_mask_built
    start = [t.detach().clone() for t in trainable]

    def syncs_while_recording(x: torch.Tensor) -> torch.Tensor:
        if torch.cuda.is_current_stream_capturing():
            torch.zeros((), device=x.device).item()  # a device sync, which a graph cannot hold
        return x * 1.0

    def failing_hook(module, args):  # the final norm (not compiled): the capture fails inside a checkpoint
        return (checkpoint(syncs_while_recording, args[0], use_reentrant=False), *args[1:])

    def run(graphs: StepGraphs | None, fail: bool = False) -> tuple[list[float], dict | None]:
        with torch.no_grad():
            for t, s in zip(trainable, start):
                t.copy_(s)
        optimizer = torch.optim.AdamW(trainable, lr=1e-3, fused=True)
        probe = RouterProbe(base, ARCHITECTURES["deepseek_v2"])
        hook = base.model.norm.register_forward_pre_hook(failing_hook) if fail else None
        try:
            losses = train_steps(model, optimizer, lambda step: batch, steps=a.steps, peak_lrs=[1e-3], warmup=1,
                                 schedule="constant", grad_clip=1.0, probe=probe, micro_batch=a.micro_batch, graphs=graphs)
        finally:
            probe.close()
            if hook is not None:
                hook.remove()
            if graphs is not None:
                graphs.close()
        return losses, graphs.summary() if graphs is not None else None

    extra: dict = {"attn": a.attn}
    if a.attn == VARLEN:
        flex, _ = run(None)
        base.set_attn_implementation(VARLEN)
    eager, _ = run(None)
    graphed, graphed_summary = run(StepGraphs(alike=alike))
    fallback, fallback_summary = run(StepGraphs(alike=alike), fail=True)
    diff = max(abs(x - y) for x, y in zip(eager, graphed))
    fallback_diff = max(abs(x - y) for x, y in zip(eager, fallback))
    ok = (graphed_summary is not None and graphed_summary["shapes"] >= 1 and graphed_summary["off"] is None
          and fallback_summary is not None and str(fallback_summary["off"]).startswith("capture failed")
          and diff <= 1e-3 and fallback_diff <= 1e-3)
    if a.attn == VARLEN:  # other kernels in bf16: the same losses up to rounding
        extra.update(flex=flex, varlen_vs_flex_max_loss_diff=max(abs(x - y) for x, y in zip(eager, flex)))
        ok = ok and extra["varlen_vs_flex_max_loss_diff"] <= 2e-2
    print(json.dumps({**extra, "layers": a.layers, "rows": a.rows, "seq": a.seq, "micro_batch": a.micro_batch,
                      "eager": eager, "graphs": graphed, "graphs_summary": graphed_summary, "max_loss_diff": diff,
                      "fallback": fallback, "fallback_summary": fallback_summary, "fallback_max_loss_diff": fallback_diff,
                      "ok": ok}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
