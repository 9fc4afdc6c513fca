"""Which AdamW implementation a set of trained tensors gets: torch's (fused where it can be) or bitsandbytes'
blockwise 8-bit one (recipe ``optimizer: adamw8bit``)."""
from __future__ import annotations

from functools import cache
from typing import Any

import torch

from dsft.errors import UsageError

NO_8BIT_SHARDS = "optimizer adamw8bit cannot update FSDP2's sharded tensors; train with --backend ddp, or use optimizer: adamw"
"""8-bit moments come in blocks of 256 values with a scale each: a block may not be split between GPUs."""


def fused_adamw_ok(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW updates every tensor in one kernel pass (foreach makes several, with temporaries):
    for plain CUDA tensors; FSDP2's sharded DTensors and CPU runs keep the default."""
    from torch.distributed.tensor import DTensor

    return bool(params) and all(p.is_cuda and not isinstance(p, DTensor) for p in params)


def build_adamw(groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], kind: str = "adamw") -> torch.optim.Optimizer:
    """AdamW over ``groups`` (torch param groups, each with its ``weight_decay``). ``kind``: ``adamw`` (torch's; its
    moments in the trained tensors' dtype) or ``adamw8bit`` (bitsandbytes' ``AdamW8bit``: the moments quantised in
    blocks of 256 values with a scale each, 2 bytes a value instead of 8 for fp32 tensors; tensors under 4,096
    values keep 32-bit moments). 8-bit moments cannot be FSDP2 shards: such runs are refused."""
    params = [p for g in groups for p in g["params"]]
    if kind == "adamw8bit":
        from torch.distributed.tensor import DTensor

        from dsft.extras import require

        (bnb,) = require("qlora", "optimizer: adamw8bit")
        if any(isinstance(p, DTensor) for p in params):
            raise UsageError(NO_8BIT_SHARDS)
        return _adamw8bit_class(bnb)(groups, lr=lr, betas=betas)
    if kind != "adamw":
        raise UsageError(f"optimizer must be adamw or adamw8bit, got {kind!r}")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused_adamw_ok(params))


def steps_as_int(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the optimizer keeps a tensor's step count as a Python int (bitsandbytes) rather than a tensor
    (torch): a checkpoint stores it as a tensor either way, and a restored state must give it back as it was."""
    return not isinstance(optimizer, torch.optim.AdamW)


@cache
def _adamw8bit_class(bnb: Any) -> type:
    """bitsandbytes' ``AdamW8bit`` whose step does not wait for the GPU. bitsandbytes 0.50 synchronises the device
    after every tensor's update (``sync_gpu`` in ``Optimizer8bit.step``; needed for its paged states only): 476
    host-device round trips a step for the lite shape's LoRA, measured 32 ms a step slower than torch's fused AdamW
    on an H200, and no host work can run ahead of the GPU meanwhile. The updates are stream-ordered kernels on the
    current stream, like any other; this step enqueues them and returns. Same updates, bit for bit
    (``tests/kernels/test_optim.py``)."""

    class AdamW8bit(bnb.optim.AdamW8bit):
        @torch.no_grad()
        def step(self, closure=None):
            if closure is not None or self.is_paged:  # (never from dsft: its own path stays the reference)
                return super().step(closure)
            if not getattr(self, "initialized", False):  # (an attribute of bitsandbytes' optimizer)
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if not self.state[p]:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return None

    return AdamW8bit
