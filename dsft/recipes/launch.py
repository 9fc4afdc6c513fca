"""``dsft train --num-gpus N``: the same command again, N times, under ``accelerate launch``.

dsft writes no launcher of its own: it generates an accelerate config file (:func:`accelerate_config`)
and runs ``python -m accelerate.commands.launch --config_file F -m dsft.cli train <the same arguments,
less the launch ones>``. accelerate starts the processes (through torchrun) and exports its settings
to them (``WORLD_SIZE``, ``RANK``, ``ACCELERATE_USE_FSDP``, ``FSDP_*``, ...), which
:meth:`dsft.recipes.distributed.Dist.from_env` reads. So ``accelerate launch --config_file F -m dsft.cli
train ...`` by hand, with a config written by ``dsft train --write-accelerate-config F`` and edited,
runs exactly the same way.

Backends: ``fsdp`` (FSDP2, the default), ``ddp`` (every GPU holds the whole model; gradients all-reduced),
``deepspeed`` (ZeRO-3: the config is written, but training under it is refused for now, see
:func:`dsft.recipes.distributed.check_deepspeed`).
"""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dsft import safe_yaml
from dsft.errors import UsageError

BACKENDS = ("fsdp", "ddp", "deepspeed")
HEADER = """\
# accelerate config written by dsft (dsft train --write-accelerate-config); edit it, then run
#   dsft train --accelerate-config THIS_FILE [--machine-rank R] ...   (or: accelerate launch --config_file THIS_FILE -m dsft.cli train ...)
# num_processes counts the processes of all machines together (one per GPU).
# What dsft reads from it: distributed_type (FSDP -> FSDP2, DEEPSPEED -> ZeRO-3, MULTI_GPU -> replicated weights),
# fsdp_version (must be 2), fsdp_transformer_layer_cls_to_wrap (the decoder layer class: one FSDP unit per layer),
# fsdp_reshard_after_forward and fsdp_offload_params. FSDP2 shards each parameter separately, so the frozen base and the
# trainable LoRA factors share a unit with no fsdp_use_orig_params (an FSDP1 setting). dsft keeps the base in bf16 and the
# adapter in fp32 itself and enables gradient checkpointing on GPUs itself, so mixed_precision and
# fsdp_activation_checkpointing stay off here.
"""


@dataclass(frozen=True)
class LaunchSettings:
    """How many processes where, and how they share the model."""

    num_processes: int = 1
    """Processes (GPUs) per machine."""
    backend: str = "fsdp"
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None
    decoder_layer: str = ""
    """The base's decoder layer class (FSDP's wrap unit), from the architecture table."""

    def check(self) -> None:
        """Raises: UsageError for impossible settings (one line each)."""
        if self.backend not in BACKENDS:
            raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.num_processes < 1 or self.num_machines < 1:
            raise UsageError(f"--num-gpus and --num-machines must be >= 1, got {self.num_processes} and {self.num_machines}")
        if not 0 <= self.machine_rank < self.num_machines:
            raise UsageError(f"--machine-rank must be in 0..{self.num_machines - 1}, got {self.machine_rank}")
        if self.num_machines > 1 and not self.main_process_ip:
            raise UsageError("--num-machines > 1 needs --main-process-ip: the address of machine rank 0, reachable from every machine")


def accelerate_config(s: LaunchSettings) -> dict[str, Any]:
    """The accelerate config (as ``accelerate config`` would write it) for ``s``."""
    s.check()
    cfg: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": {"fsdp": "FSDP", "ddp": "MULTI_GPU", "deepspeed": "DEEPSPEED"}[s.backend],
        "num_machines": s.num_machines,
        "num_processes": s.num_processes * s.num_machines,
        "machine_rank": s.machine_rank,
        "main_process_ip": s.main_process_ip,
        "main_process_port": s.main_process_port,
        "rdzv_backend": "static",
        "same_network": True,
        "mixed_precision": "no",
        "downcast_bf16": "no",
        "use_cpu": False,  # True would make accelerate start one process; --device cpu runs the ranks on gloo instead
        "main_training_function": "main",
        "debug": False,
    }
    if s.num_machines == 1:
        cfg.pop("main_process_ip")
    if cfg["main_process_port"] is None:
        cfg.pop("main_process_port")
    if s.backend == "fsdp":
        cfg["fsdp_config"] = {
            "fsdp_version": 2,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_transformer_layer_cls_to_wrap": s.decoder_layer,
            "fsdp_reshard_after_forward": True,
            "fsdp_offload_params": False,
            "fsdp_cpu_ram_efficient_loading": False,  # every rank loads the base, then dsft shards it
            "fsdp_state_dict_type": "FULL_STATE_DICT",  # dsft saves the adapter itself, from whole tensors on rank 0
            "fsdp_activation_checkpointing": False,
        }
    elif s.backend == "deepspeed":
        cfg["deepspeed_config"] = {"zero_stage": 3, "offload_optimizer_device": "none", "offload_param_device": "none",
                                   "zero3_init_flag": False, "zero3_save_16bit_model": False, "gradient_accumulation_steps": 1}
    return cfg


def config_text(s: LaunchSettings) -> str:
    return HEADER + yaml.safe_dump(accelerate_config(s), sort_keys=False)


def write_config(path: str | Path, s: LaunchSettings) -> Path:
    from dsft.atomic import write_text_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, config_text(s))
    return path


def generated_config(s: LaunchSettings) -> Path:
    """``$DSFT_HOME/accelerate/<backend>-<procs>x<machines>-<hash>.yaml``: one file per distinct setting, kept so
    that a launch can be inspected or repeated by hand."""
    from dsft.home import dsft_home

    text = config_text(s)
    name = f"{s.backend}-{s.num_processes}x{s.num_machines}-{hashlib.sha256(text.encode()).hexdigest()[:8]}.yaml"
    return write_config(dsft_home() / "accelerate" / name, s)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_argv(config: Path, worker_args: list[str], overrides: dict[str, Any]) -> list[str]:
    """``python -m accelerate.commands.launch --config_file CONFIG [--key value ...] -m dsft.cli train WORKER_ARGS``;
    ``overrides`` (accelerate's own flag names) win over the file."""
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    for key, value in overrides.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    return argv + ["-m", "dsft.cli", "train", *worker_args]


def settings_for(base: str, *, num_gpus: int | None, backend: str, num_machines: int = 1, machine_rank: int = 0,
                 main_process_ip: str | None = None, main_process_port: int | None = None, device: str | None = None,
                 for_launch: bool = True) -> LaunchSettings:
    """Launch settings for training ``base`` (its decoder layer class is FSDP's unit), checked.

    ``for_launch=False``: for a config file only (no port is picked, no GPU or package check on this machine).

    Raises:
        UsageError: bad counts or ranks, more GPUs than this machine has, DeepSpeed missing or unsupported.
        NotFoundError, UnsupportedModelError: ``base`` does not resolve to a supported model.
    """
    import torch

    from dsft.base.arch import spec_for
    from dsft.base.loading import read_config, resolve_base
    from dsft.recipes.distributed import check_deepspeed

    config = read_config(resolve_base(base))
    spec = spec_for(config.get("model_type"), config.get("architectures"))
    if main_process_port is None and for_launch:  # a fixed default would collide with any other run on this machine
        main_process_port = free_port() if num_machines == 1 else 29500
    s = LaunchSettings(num_gpus or 1, backend, num_machines, machine_rank, main_process_ip, main_process_port, spec.decoder_layer)
    s.check()
    if backend == "deepspeed" and for_launch:
        check_deepspeed()
    if device != "cpu" and for_launch and torch.cuda.device_count() < s.num_processes:
        raise UsageError(f"--num-gpus {s.num_processes}: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
                         "use fewer, or --device cpu for CPU processes")
    return s


def launch(config: Path, worker_args: list[str], overrides: dict[str, Any]) -> int:
    """Run the processes and wait; returns accelerate's exit status (non-zero when any rank failed)."""
    file = safe_yaml.load_file(Path(config), "accelerate config") or {}
    per_machine = int(overrides.get("num_processes") or file.get("num_processes") or 1) // \
        max(1, int(overrides.get("num_machines") or file.get("num_machines") or 1))
    env = dict(os.environ)
    # Share this machine's cores between its processes: more threads than cores makes every collective wait on a
    # descheduled thread (a 2-process CPU run went from 15 s to 70 s with 2 threads each on 2 cores).
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, per_machine))))
    return subprocess.run(launch_argv(config, worker_args, overrides), env=env).returncode
