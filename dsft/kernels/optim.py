"""Which AdamW implementation a set of trained tensors gets."""
from __future__ import annotations

import torch


def fused_adamw_ok(params: list[torch.Tensor]) -> bool:
    """torch's fused AdamW updates every tensor in one kernel pass (foreach makes several, with temporaries):
    for plain CUDA tensors; FSDP2's sharded DTensors and CPU runs keep the default."""
    from torch.distributed.tensor import DTensor

    return bool(params) and all(p.is_cuda and not isinstance(p, DTensor) for p in params)
