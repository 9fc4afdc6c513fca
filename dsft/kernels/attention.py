"""Which SDPA backends training may use.

cuDNN's attention backward can return NaN in the query gradient on Hopper cards when an explicit mask
is passed and a row's scores are all very negative (pytorch#196678, a regression since torch 2.11;
huggingface/trl#7181 meets it on torch 2.13 through a pretrained model's "massive activation" head).
dsft's packed rows always carry a mask (transformers builds the per-example block-diagonal mask from
``position_ids``), so training leaves cuDNN out and SDPA picks flash or memory-efficient attention,
which compute the same function. This is the configuration confirmed on an H200
(``benchmarks/results/2026-12-01-h200-issue21-nan.md``); what it costs in speed against cuDNN is not
measured yet. ``DSFT_SDPA_CUDNN=1`` lets cuDNN back in (to measure it, or on a torch that fixed the bug).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager


def cudnn_allowed() -> bool:
    return os.environ.get("DSFT_SDPA_CUDNN", "0") == "1"


@contextmanager
def training_sdpa_backends() -> Iterator[None]:
    """Inside the block SDPA does not pick cuDNN attention (unless ``DSFT_SDPA_CUDNN=1``); the previous
    setting is restored after, so a Python caller's own choice survives a :func:`dsft.recipes.runner.train`."""
    import torch

    if cudnn_allowed() or not torch.cuda.is_available():
        yield
        return
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
