"""``dsft train``: a thin wrapper over :func:`dsft.train` with a live progress bar."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dsft.base.presets import DEFAULT_BASE
from dsft.cli.common import (
    DATA_HELP,
    FIELD_HELP,
    SPLIT_HELP,
    console,
    data_sources,
    err_console,
    fail,
    guarded,
    print_json,
    split_data_args,
)
from dsft.errors import DsftError, UsageError


def _heldout(payload: dict) -> str:
    """An evaluation event's losses, as the progress output prints them."""
    user = f"user held-out loss {payload['user_loss']:.4f}, " if "user_loss" in payload else ""
    return f"{user}generated pack text loss {payload['domain_loss']:.4f}, general loss {payload['general_loss']:.4f}"


class _ProgressView:
    """Renders training events: one bar per stage with step, loss, tokens/s and ETA."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.progress: Progress | None = None
        self.task = None
        self.stage = ""

    def __call__(self, kind: str, payload: dict[str, Any]) -> None:
        out = err_console
        if kind == "base" and not self.quiet:
            out.print(f"base [bold]{payload['name']}[/] ({payload['architecture']}) on {payload['device']}"
                      + (", each process reading its own shard" if payload.get("sharded_load") else ""))
        elif kind == "recompute" and payload["kept_layers"] and not self.quiet:
            how = ("all but attention's query, key and value, which backward recomputes" if payload.get("attention_recomputed")
                   else "no recompute")
            out.print(f"activation checkpointing: the last {payload['kept_layers']} of {payload['layers']} layers keep "
                      f"their activations ({how}; --keep-layers 0 for least memory)")
        elif kind == "quantized" and not self.quiet:
            out.print(f"frozen base in NF4: {payload['linears']} linears + {payload['expert_tensors']} fused expert tensors, "
                      f"{payload['mib_before']:,} MiB -> {payload['mib_after']:,} MiB")
        elif kind == "eval" and not self.quiet:
            self._close()
            user = f"user held-out loss {payload['user_loss']:.4f} (ppl {payload['user_ppl']:.2f}), " if "user_loss" in payload else ""
            out.print(f"held-out {payload['when']}: {user}generated pack text loss {payload['domain_loss']:.4f} "
                      f"(ppl {payload['domain_ppl']:.2f}), general loss {payload['general_loss']:.4f}", highlight=False)
        elif kind == "data_plan" and not self.quiet:
            from dsft.recipes.data_plan import render as render_plan  # here: the CLI starts without torch

            self._close()
            for line in render_plan(payload):
                out.print(line, highlight=False)
        elif kind == "warning":
            self._close()
            out.print(f"warning: {payload['message']}", style="yellow", markup=False, highlight=False)
        elif kind == "resume" and not self.quiet:
            out.print(f"resuming run {payload['run']} at stage {payload['stage']}, step {payload['step']}")
        elif kind == "teacher" and not self.quiet:
            out.print(f"stage [bold]{payload['stage']}[/]: teacher {payload['teacher']}")
        elif kind == "stage_eval" and not self.quiet:
            self._close()
            out.print(f"after stage {payload['stage']}: {_heldout(payload)}")
        elif kind == "step_eval" and not self.quiet:
            line = f"step {payload['step']} of {payload['stage']}: {_heldout(payload)}"
            (self.progress.console if self.progress is not None else out).print(line, highlight=False)  # above the bar
        elif kind == "stage_start":
            self._close()
            if not self.quiet:
                experts = f", experts {payload['experts']}" if payload.get("experts") else ""
                start = f" (from step {payload['start_step']})" if payload.get("start_step") else ""
                out.print(f"stage [bold]{payload['stage']}[/] ({payload['kind']}): {payload['steps']} steps{start}, "
                          f"{payload['trainable']:,} trainable parameters{experts}, mixture {payload['realised_mixture']}")
            self.progress = Progress(
                TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=out, disable=self.quiet,
            )
            self.progress.start()
            # until its first step ends a stage is warming up (on a GPU: compiling each layer once)
            self.stage = payload["stage"]
            self.task = self.progress.add_task(f"{self.stage} (warm-up)", total=payload["steps"],
                                               completed=payload.get("start_step", 0), loss=0.0, tps=0.0)
        elif kind == "step" and self.progress is not None:
            info = payload["info"]
            self.progress.update(self.task, completed=info.step, loss=info.loss, tps=info.tokens_per_s, description=self.stage)
        elif kind == "saved":
            self._close()

    def _close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def resume_command() -> str:
    """This very command line with ``--resume``: what continues an interrupted run."""
    import shlex
    import sys

    args = sys.argv[1:]
    return shlex.join(["dsft", *args, *([] if "--resume" in args else ["--resume"])])


LAUNCH_OPTIONS = {"num_gpus", "backend", "num_machines", "machine_rank", "main_process_ip", "main_process_port",
                  "accelerate_config", "write_accelerate_config"}


def _worker_args(ctx: typer.Context) -> list[str]:
    """This command's arguments as given, less the launch options: what each launched process runs."""
    args, positional = [], []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name in LAUNCH_OPTIONS or value is None or value == param.default:
            continue
        if param.param_type_name == "argument":
            positional += [str(v) for v in value]
        elif param.is_flag:
            args.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            for v in value if param.multiple else [value]:
                args += [param.opts[0], str(v)]
    return args + positional


def _launch(ctx: typer.Context, a: dict[str, Any]) -> int:
    """Check the arguments once, then run this command under accelerate launch (see dsft.recipes.launch)."""
    from dsft import safe_yaml
    from dsft.recipes.launch import generated_config, launch, settings_for
    from dsft.recipes.runner import check_run

    check_run(domain=a["domain"], base=a["base"], recipe=a["recipe"], data=a["sources"], overrides=a["overrides"] or (),
              seed=a["seed"], max_steps=a["max_steps"], output=a["output"], registry=a["registry"], resume=a["resume"],
              checkpoint_every=a["checkpoint_every"], trust_remote_code=a["trust_remote_code"],
              eval_data=a["eval_data"] or (), generated=a["generated"])
    from dsft.eval.tracking import parse_report_to, reachable_trackers

    reachable_trackers(parse_report_to(a["report_to"]), a["report_to_optional"])
    given = {"num_processes": a["num_gpus"] and a["num_gpus"] * a["num_machines"], "num_machines": a["num_machines"],
             "machine_rank": a["machine_rank"], "main_process_ip": a["main_process_ip"], "main_process_port": a["main_process_port"]}
    if a["accelerate_config"] is not None:  # the file decides, except for what was given on this command line
        config = a["accelerate_config"]
        if not config.is_file():
            raise UsageError(f"--accelerate-config {config}: no such file; write one with --write-accelerate-config {config}")
        defaults = {"num_machines": 1, "machine_rank": 0}
        overrides = {k: v for k, v in given.items() if v is not None and v != defaults.get(k)}
        file = safe_yaml.load_file(config, "--accelerate-config") or {}
        if not isinstance(file, dict):
            raise UsageError(f"--accelerate-config {config}: must be a YAML mapping (as --write-accelerate-config writes)")
        if "main_process_port" not in file and "main_process_port" not in overrides and int(file.get("num_machines", 1)) == 1:
            from dsft.recipes.launch import free_port

            overrides["main_process_port"] = free_port()
    else:
        settings = settings_for(a["base"], num_gpus=a["num_gpus"], backend=a["backend"], num_machines=a["num_machines"],
                                machine_rank=a["machine_rank"], main_process_ip=a["main_process_ip"],
                                main_process_port=a["main_process_port"], device=a["device"])
        config, overrides = generated_config(settings), {}
    return launch(config, _worker_args(ctx), overrides)


@guarded
def train_command(
    ctx: typer.Context,
    overrides: list[str] = typer.Argument(None, help="Recipe overrides in dotted form, e.g. stages.0.lr=2e-5 (other "
                                          "arguments after --data are more data: what a shell glob expands to)", show_default=False),
    domain: str = typer.Option("finance", "--domain", "-d", help="Domain name (finance, legal, medical, or one of yours) or a domain YAML file."),
    base: str = typer.Option(DEFAULT_BASE, "--base", "-b", help="Preset name, local model directory or hub id."),
    recipe: str = typer.Option(None, "--recipe", "-r", help="Built-in recipe name or YAML file (default: the domain's)."),
    data: list[str] = typer.Option(None, "--data", help=DATA_HELP),
    field: list[str] = typer.Option(None, "--field", help=FIELD_HELP),
    split: str = typer.Option("train", "--split", help=SPLIT_HELP),
    eval_data: list[str] = typer.Option(None, "--eval-data", help="Held-out data to measure the adapter on (repeatable); "
                                        "default: a deterministic 2% of your data (at least 50 records) that never trains."),
    generated: bool = typer.Option(False, "--generated", help="Train on the domain's generated template text too when "
                                   "you give data (by default your data replaces it)."),
    seed: int = typer.Option(None, "--seed", help="Random seed (default: the recipe's); same seed, same adapter."),
    max_steps: int = typer.Option(None, "--max-steps", help="Cap every stage at this many steps."),
    output: Path = typer.Option(None, "--output", "-o", help="Also copy the finished adapter here."),
    registry: str = typer.Option(None, "--registry", help="Registry SQLAlchemy URL (default $DSFT_REGISTRY_URL or $DSFT_HOME/registry.db)."),
    device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model code shipped with the base to run."),
    compile_layers: bool = typer.Option(True, "--compile/--no-compile", help="On a GPU, torch.compile each decoder layer."),
    keep_layers: str = typer.Option("auto", "--keep-layers", help="On a GPU, leave the last N decoder layers out of activation "
                                    "checkpointing: faster, at one layer's activations more memory each; auto (default): as "
                                    "many as the planner fits on the card (10% spare), the micro-batch sized for it; 0: "
                                    "every layer recomputes (least memory)."),
    recompute_attention: bool = typer.Option(None, "--recompute-attention/--no-recompute-attention", help="In the layers "
                                             "--keep-layers keeps, recompute attention's query, key and value in backward "
                                             "(the attention kernel's outputs stay kept): ~30% less memory a kept layer, "
                                             "~0.2% slower each. Default: auto turns it on where not every layer fits plainly."),
    qlora: bool = typer.Option(False, "--qlora", help="Hold the frozen base in 4-bit NF4 while LoRA trains in bf16 (QLoRA; "
                               "the override quantize=nf4). Uses bitsandbytes."),
    eval_every: int = typer.Option(None, "--eval-every", help="Also measure the held-out sets every N steps inside each "
                                   "stage (printed, tracked, in the training log; the override eval_every=N)."),
    optimizer: str = typer.Option(None, "--optimizer", help="adamw (the recipe's default) or adamw8bit: AdamW's moments in "
                                  "8 bits (bitsandbytes), 2 bytes a trained value instead of 8, so more layers fit "
                                  "without recompute (the override optimizer=adamw8bit)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the last unfinished run of this domain from its last checkpoint "
                                "(same recipe, overrides, base, seed, --max-steps and --data)."),
    checkpoint_every: int = typer.Option(50, "--checkpoint-every", help="Checkpoint every N steps inside a stage (0: at stage ends only)."),
    report_to: str = typer.Option("tensorboard", "--report-to", help="Track the run live: tensorboard (events in the run "
                                  "directory's tracking/), mlflow, wandb, a comma-separated list, all (every one installed) or none. "
                                  "MLflow logs to MLFLOW_TRACKING_URI, else to $DSFT_HOME/mlflow.db."),
    report_to_optional: bool = typer.Option(False, "--report-to-optional", help="Train even when a tracking server does "
                                            "not answer (a warning instead of an error); a tracker failing mid-run is "
                                            "always dropped with a warning."),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress output."),
    num_gpus: int = typer.Option(None, "--num-gpus", help="Train on N GPUs of this machine, one process each, through "
                                 "accelerate launch (the recipe's batch_size stays the global batch). With --device cpu: N CPU processes (gloo)."),
    backend: str = typer.Option("fsdp", "--backend", help="How the processes share the model: fsdp (FSDP2 sharding), "
                                "ddp (a whole copy per GPU) or deepspeed (ZeRO-3)."),
    num_machines: int = typer.Option(1, "--num-machines", help="Machines of a multi-node run; run the same command on each "
                                     "with its --machine-rank."),
    machine_rank: int = typer.Option(0, "--machine-rank", help="This machine's rank in a multi-node run (0 = the main one)."),
    main_process_ip: str = typer.Option(None, "--main-process-ip", help="Address of machine rank 0 (multi-node)."),
    main_process_port: int = typer.Option(None, "--main-process-port", help="Port on machine rank 0 (default: a free one "
                                          "on one machine, 29500 across machines)."),
    accelerate_config: Path = typer.Option(None, "--accelerate-config", help="Launch with this accelerate config file "
                                           "(e.g. one from --write-accelerate-config, edited); options given here win over it."),
    write_accelerate_config: Path = typer.Option(None, "--write-accelerate-config", help="Write the accelerate config that "
                                                 "these options launch with to this file, and exit."),
) -> None:
    """Train a domain adapter and register it.

    Example: dsft train --domain finance --recipe two-stage stages.1.lr=2e-3

    Example (your data, your column names): dsft train --domain legal --data contracts/ --data qa.csv --field response=answer
    Example (your data, your held-out file): dsft train --domain contracts --data text.jsonl --eval-data heldout.jsonl

    Example (2 GPUs, FSDP2): dsft train --domain finance --num-gpus 2

    Example (QLoRA, 4-bit base): dsft train --domain legal --base deepseek-ai/DeepSeek-V2-Lite --qlora
    Example (8-bit optimizer moments): dsft train --domain finance --optimizer adamw8bit
    Example (held-out losses every 50 steps too): dsft train --domain contracts --data text.jsonl --eval-every 50
    """
    import os

    from dsft.recipes.run_checks import check_device
    from dsft.recipes.runner import train

    check_device(device)
    if num_gpus is not None and num_gpus < 1:
        raise UsageError(f"--num-gpus must be >= 1, got {num_gpus}")
    if write_accelerate_config is not None:
        from dsft.recipes.launch import settings_for, write_config

        settings = settings_for(base, num_gpus=num_gpus, backend=backend, num_machines=num_machines, machine_rank=machine_rank,
                                main_process_ip=main_process_ip, main_process_port=main_process_port, device=device,
                                for_launch=False)
        path = write_config(write_accelerate_config, settings)
        console.print(f"wrote {path}; edit it, then: dsft train --accelerate-config {path} [--machine-rank R] ...")
        return
    data, overrides = split_data_args(overrides, data)
    overrides = [*(overrides or ()), *(["quantize=nf4"] if qlora else []), *([f"optimizer={optimizer}"] if optimizer else []),
                 *([f"eval_every={eval_every}"] if eval_every is not None else [])]
    sources = data_sources(data, field, split)
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1  # this is one rank of a launched run
    if not launched and ((num_gpus or 1) > 1 or num_machines > 1 or accelerate_config is not None):
        code = _launch(ctx, {**ctx.params, "overrides": overrides, "sources": sources})
        if code:
            raise typer.Exit(code)
        return

    from dsft.recipes.distributed import Dist

    dist = Dist.from_env(device)
    if not dist.main:  # rank 0 speaks for the run
        logging.getLogger("dsft").setLevel(logging.ERROR)
    view = _ProgressView(quiet or json_out or not dist.main)
    try:
        result = train(domain=domain, base=base, recipe=recipe, data=sources, overrides=overrides, seed=seed,
                       max_steps=max_steps, output=output, registry=registry, device=device,
                       trust_remote_code=trust_remote_code, compile_layers=compile_layers,
                       keep_layers=int(keep_layers) if keep_layers.isdigit() else keep_layers,
                       recompute_attention=recompute_attention, on_event=view,
                       resume=resume, checkpoint_every=checkpoint_every, dist=dist, eval_data=eval_data or (),
                       generated=generated, report_to=report_to, report_to_optional=report_to_optional)
    except DsftError as exc:
        if getattr(exc, "from_rank0", False):
            raise typer.Exit(exc.exit_code) from None
        raise
    except KeyboardInterrupt:
        view._close()
        fail(f"interrupted; nothing was registered. Continue from the run's last checkpoint (every "
             f"{checkpoint_every} steps and at each stage's end) with: {resume_command()}", 130)
    finally:
        view._close()
        dist.close()
    if not dist.main:
        return
    if json_out:
        print_json(result.to_json())
        return
    m = result.metrics
    console.print(f"[bold green]{result.adapter}[/] saved to {result.path}")
    h = m["headline"]
    console.print(f"{h['set']}: perplexity {h['ppl_before']:.2f} -> {h['ppl_after']:.2f} ({100 * h['ppl_reduction']:.1f}% lower); "
                  f"general loss {m['general_loss_before']:.3f} -> {m['general_loss_after']:.3f}")
