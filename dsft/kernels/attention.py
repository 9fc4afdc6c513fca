"""The attention a model trains with on a GPU: variable-length flash attention over packed rows where the
model's heads allow it, flex attention otherwise, SDPA without cuDNN where neither applies.

dsft's training rows are packed: several examples per row, each attending only to itself. SDPA can only take
that as a dense ``[rows, 1, seq, seq]`` mask, which rules out its flash kernel and its causal block skipping:
measured on an H200 (DeepSeek-V2-Lite shape, 5 x 6,144 packed SFT-like rows, compiled layers;
``benchmarks/results/2026-12-01-h200-issue21-packed.md``) the memory-efficient kernel ran at 5,301
tokens/s and cuDNN's at 14,825, against 21,403 for unmasked causal rows. Flex attention builds a block
mask from the same position ids and skips every block outside an example: 22,911 tokens/s. Variable-length
flash attention (:mod:`dsft.kernels.varlen`) takes the examples' lengths instead of a mask: faster again
(1.74 -> 1.28 ms for one layer's forward and backward at 4 x 2048), and nothing is built from the data in the
forward, so every batch can be captured as a CUDA graph. It is the default for models whose key/value heads are
as many as the query heads (DeepSeek-V2/V3 after MLA's expansion, OLMoE, Qwen1.5-MoE); grouped-query models
(Mixtral, Qwen3-MoE) keep flex attention, which shares key heads without copying them.

cuDNN's masked attention backward can also return NaN in the query gradient on Hopper (pytorch#196678,
torch >= 2.11), so where neither applies (an architecture whose transformers class does not support flex
attention) training leaves cuDNN out of SDPA. ``DSFT_ATTENTION=varlen|flex_attention|sdpa`` picks one (to
compare); ``DSFT_SDPA_CUDNN=1`` lets cuDNN back in (to measure it, or on a torch that fixed the bug).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from dsft.kernels import varlen

FLEX = "flex_attention"
CHOICES = {"varlen": varlen.VARLEN, varlen.VARLEN: varlen.VARLEN, FLEX: FLEX, "sdpa": "sdpa"}


def cudnn_allowed() -> bool:
    return os.environ.get("DSFT_SDPA_CUDNN", "0") == "1"


def training_implementation(model, device: torch.device | str) -> str | None:
    """The attention implementation to train ``model`` with on ``device``: on CUDA ``"dsft_varlen"`` where the
    kernel exists, the model's key/value heads equal its query heads and its attention has no dropout and no sliding
    window, else
    ``"flex_attention"`` where its class supports it; ``DSFT_ATTENTION`` overrides (``sdpa``: the model's own).
    None: leave the model's own."""
    wanted = os.environ.get("DSFT_ATTENTION")
    if wanted is not None and wanted not in CHOICES:
        from dsft.errors import UsageError

        raise UsageError(f"DSFT_ATTENTION={wanted!r}: use varlen (the default on a GPU), flex_attention or sdpa")
    if torch.device(device).type != "cuda" or wanted == "sdpa":
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    flex = FLEX if getattr(type(base), "_supports_flex_attn", False) else None
    if wanted is not None:
        return CHOICES[wanted] if CHOICES[wanted] != FLEX else flex
    return varlen.VARLEN if varlen.kernel_available() and _varlen_fits(base.config) else flex


def _varlen_fits(config) -> bool:
    """As many key/value heads as query heads (grouped ones would be copied), no attention dropout and no sliding
    window (what :func:`dsft.kernels.varlen.attention_forward` computes)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    sliding = (getattr(text, "sliding_window", None) is not None and getattr(text, "use_sliding_window", True)
               or "sliding_attention" in (getattr(text, "layer_types", None) or ()))
    return (heads is not None and getattr(text, "num_key_value_heads", None) in (None, heads)
            and not getattr(text, "attention_dropout", 0.0) and not sliding)


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
    if impl == varlen.VARLEN:
        varlen.register()
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


@contextmanager
def attention_as(model, impl: str | None) -> Iterator[None]:
    """Inside the block ``model`` runs with attention ``impl`` (None: unchanged), then with the one it had: an
    evaluation in the middle of training uses the model's own attention, as the stage's final one does, not the
    training kernel (variable-length attention reads the packed batches' offsets, which held-out rows need not have)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    if impl is not None and impl != before:
        base.set_attn_implementation(impl)
    try:
        yield
    finally:
        if base.config._attn_implementation != before:
            base.set_attn_implementation(before)
