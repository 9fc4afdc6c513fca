"""What ``dsft plan`` is asked: one training setting, validated (no torch import, so the CLI starts fast)."""
from __future__ import annotations

from dataclasses import dataclass

from dsft.errors import UsageError

METHODS = ("lora", "qlora", "esft", "full")
OPTIMIZERS = ("adamw", "adamw8bit")
GIB = 2**30


@dataclass(frozen=True)
class PlanRequest:
    """One training setting to estimate."""

    base: str
    method: str = "lora"
    seq: int = 2048
    batch: int = 4
    checkpointing: bool = True
    gpu_mem_gib: float | None = None
    device: str = "cuda"
    """``cuda`` (bf16 weights) or ``cpu`` (fp32 weights, no CUDA overhead), as dsft trains on each."""
    lora_r: int = 16
    esft_share: float = 0.125
    """Share of routed experts ESFT trains (the builtin recipe selects about 1 in 8 on the presets)."""
    new_terms: int = 200
    num_gpus: int = 1
    """GPUs sharing the run through FSDP2 (``dsft train --num-gpus``); ``batch`` is then the rows of each GPU."""
    optimizer: str = "adamw"
    """The recipe's ``optimizer``: ``adamw8bit`` keeps AdamW's two moments in 8 bits (2 bytes a trained value)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"--method: must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("seq", "batch", "lora_r", "num_gpus"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')}: must be > 0, got {getattr(self, name)}")
        if self.gpu_mem_gib is not None and self.gpu_mem_gib <= 0:
            raise UsageError(f"--gpu-mem: must be > 0 GiB, got {self.gpu_mem_gib}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"--optimizer: must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.device not in ("cuda", "cpu"):
            raise UsageError(f"device: must be cuda or cpu, got {self.device!r}")
        if not 0 < self.esft_share <= 1:
            raise UsageError(f"esft share: must be in (0, 1], got {self.esft_share}")
