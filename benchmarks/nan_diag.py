"""Name where a `dsft train` step first goes non-finite: runs the CLI in this process with hooks that report the
first module whose forward output is non-finite, the parameters whose gradients are non-finite before the
optimizer step, and (``--anomaly``) autograd's anomaly mode, which names the forward op of a backward that
returned NaN. ``--toggle`` switches one suspect off to see whether the NaN goes with it.

    python benchmarks/nan_diag.py --toggle none --anomaly -- --domain finance --base deepseek-v2-lite-shape --max-steps 2 --no-compile
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

TOGGLES = ("none", "reference_experts", "no_fold", "full_ce", "no_aux", "cudnn_on")


def _finite(out) -> bool:
    ts = [out] if isinstance(out, torch.Tensor) else [t for t in (out if isinstance(out, (tuple, list)) else getattr(out, "values", lambda: [])())
                                                      if isinstance(t, torch.Tensor)]
    # dsft plan's memory model runs forwards on the meta device: those have no values to check
    return all(bool(torch.isfinite(t).all()) for t in ts if t.is_floating_point() and not t.is_meta)


def install_hooks(report: list[dict]) -> None:
    seen = {"forward": False}

    def forward_hook(module, args, out):
        if not seen["forward"] and not _finite(out):
            seen["forward"] = True
            inputs_finite = _finite(tuple(a for a in args if isinstance(a, torch.Tensor)))
            report.append({"event": "forward_nonfinite", "module": type(module).__name__, "inputs_finite": inputs_finite})
            print(json.dumps(report[-1]), flush=True)

    torch.nn.modules.module.register_module_forward_hook(forward_hook)
    names: dict[int, str] = {}

    def pre_step(optimizer, args, kwargs):
        if any(p.is_meta for g in optimizer.param_groups for p in g["params"]):
            return  # dsft plan's memory model
        if not names:
            import gc

            for obj in gc.get_objects():
                if isinstance(obj, torch.nn.Module) and hasattr(obj, "named_parameters") and type(obj).__name__.endswith("ForCausalLM"):
                    for n, p in obj.named_parameters():
                        names.setdefault(id(p), n)
        bad = [names.get(id(p), str(tuple(p.shape))) for g in optimizer.param_groups for p in g["params"]
               if p.grad is not None and not p.is_meta and not bool(torch.isfinite(p.grad).all())]
        n = sum(1 for g in optimizer.param_groups for p in g["params"] if p.grad is not None)
        report.append({"event": "grads", "with_grad": n, "nonfinite": len(bad), "first": bad[:20]})
        print(json.dumps(report[-1]), flush=True)

    def post_step(optimizer, args, kwargs):
        if any(p.is_meta for g in optimizer.param_groups for p in g["params"]):
            return
        bad = [names.get(id(p), str(tuple(p.shape))) for g in optimizer.param_groups for p in g["params"] if not p.is_meta and not bool(torch.isfinite(p).all())]
        report.append({"event": "params_after_step", "nonfinite": len(bad), "first": bad[:20]})
        print(json.dumps(report[-1]), flush=True)

    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    register_optimizer_step_pre_hook(pre_step)
    register_optimizer_step_post_hook(post_step)


def apply_toggle(name: str) -> None:
    if name == "reference_experts":
        import dsft.kernels.expert_lora as el

        el.use_grouped_kernel = lambda x: False
    elif name == "no_fold":
        import dsft.recipes.runner as runner

        runner.fold_lora = lambda model, dense=False: 0
    elif name == "full_ce":
        import dsft.kernels.chunked_ce as ce

        ce._sharded = lambda params: True  # the checkpointed path over every position, no selection
    elif name == "no_aux":
        from dsft.base.router import RouterProbe

        RouterProbe.aux_loss = lambda self: None
    elif name == "cudnn_on":  # dsft.kernels.attention leaves cuDNN attention out of training otherwise
        import os

        os.environ["DSFT_SDPA_CUDNN"] = "1"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--toggle", choices=TOGGLES, default="none")
    ap.add_argument("--anomaly", action="store_true")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    report: list[dict] = []
    install_hooks(report)
    apply_toggle(args.toggle)
    if args.anomaly:
        torch.autograd.set_detect_anomaly(True, check_nan=True)
    from dsft.cli.main import run

    rest = [a for a in args.rest if a != "--"]
    sys.argv = ["dsft", "train", *rest]
    print(json.dumps({"toggle": args.toggle, "anomaly": args.anomaly, "argv": sys.argv}), flush=True)
    try:
        run()
    except SystemExit as e:
        print(json.dumps({"toggle": args.toggle, "exit": e.code}), flush=True)


if __name__ == "__main__":
    main()
