"""The attention a model trains with on a GPU: flex attention over packed rows, SDPA without cuDNN otherwise.

dsft's training rows are packed: several examples per row, each attending only to itself (transformers
builds the per-example block-diagonal causal mask from ``position_ids``). SDPA can only take that mask as
a dense ``[rows, 1, seq, seq]`` tensor, which rules out its flash kernel and its causal block skipping:
measured on an H200 (DeepSeek-V2-Lite shape, 5 x 6,144 packed SFT-like rows, compiled layers;
``benchmarks/results/2026-12-01-h200-issue21-packed.md``) the memory-efficient kernel ran at 5,301
tokens/s and cuDNN's at 14,825, against 21,403 for unmasked causal rows. Flex attention builds a block
mask from the same position ids and skips every block outside an example: 22,911 tokens/s.

cuDNN's masked attention backward can also return NaN in the query gradient on Hopper (pytorch#196678,
torch >= 2.11), so where flex attention is not available (an architecture whose transformers class does
not support it) training leaves cuDNN out of SDPA. ``DSFT_ATTENTION=sdpa`` keeps SDPA everywhere (to
compare); ``DSFT_SDPA_CUDNN=1`` lets cuDNN back in (to measure it, or on a torch that fixed the bug).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

FLEX = "flex_attention"


def cudnn_allowed() -> bool:
    return os.environ.get("DSFT_SDPA_CUDNN", "0") == "1"


def training_implementation(model, device: torch.device | str) -> str | None:
    """The attention implementation to train ``model`` with on ``device``: ``"flex_attention"`` on CUDA where
    its class supports it (and ``DSFT_ATTENTION`` does not say ``sdpa``); None: leave the model's own."""
    wanted = os.environ.get("DSFT_ATTENTION", FLEX)
    if wanted not in (FLEX, "sdpa"):
        from dsft.errors import UsageError

        raise UsageError(f"DSFT_ATTENTION={wanted!r}: use flex_attention (the default on a GPU) or sdpa")
    if torch.device(device).type != "cuda" or wanted != FLEX:
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return FLEX if getattr(type(base), "_supports_flex_attn", False) else None


@contextmanager
def training_attention(model, device: torch.device | str) -> Iterator[str]:
    """Inside the block ``model`` trains with :func:`training_implementation`'s choice and SDPA does not pick
    cuDNN (unless ``DSFT_SDPA_CUDNN=1``). The model's implementation and the SDPA backends are restored
    after, so evaluation and generation run as before and a Python caller's own settings survive.
    Yields the implementation in use."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before_impl = base.config._attn_implementation
    impl = training_implementation(model, device)
    cuda = torch.device(device).type == "cuda"
    cudnn_before = torch.backends.cuda.cudnn_sdp_enabled()
    if impl and impl != before_impl:
        base.set_attn_implementation(impl)
    if cuda and not cudnn_allowed():
        torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield base.config._attn_implementation
    finally:
        torch.backends.cuda.enable_cudnn_sdp(cudnn_before)
        if base.config._attn_implementation != before_impl:
            base.set_attn_implementation(before_impl)
