"""A kept layer's attention inputs recomputed in backward, the attention kernel's outputs kept.

A decoder layer that keeps its activations (``dsft train --keep-layers``) saves, for its attention, the query, key
and value the kernel reads: on DeepSeek-V2-Lite at 8,192 tokens three [8,192 x 3,072] bf16 tensors (value padded to
the query's width), 144 MiB of the ~0.6 GiB such a layer keeps (named by their size at the measured peak: the tool
reports code lines; with this wrapper they are gone from it and a kept layer holds 0.18 GiB less). They come from
the layer's input through a few small GEMMs. Wrapped here, the attention module runs under selective activation checkpointing: backward runs its
projections again from its input, while the outputs of the attention kernel itself (any op whose name says
attention) are kept, so the kernel does not run twice.

Measured on an H200 (lite shape, 4 x 2048, compiled, CUDA graphs; ``benchmarks/results/2026-12-02-h200-attention-
recompute.md``): a kept layer holds 0.42 GiB instead of 0.60, for 0.2% of the step each; 22 layers kept this way
(26,305 tokens/s, 43.3 GiB) beat the 16 that fit plainly in the same memory (25,474, 43.7 GiB). ``--keep-layers
auto`` chooses it where not every layer fits plainly (:func:`dsft.eval.plan.keep_plan`). Forwards must run with
``use_cache=False`` (as training does): a recomputed forward would append to a KV cache again.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_PLAIN = "_dsft_plain_forward"


def keeps_attention_outputs(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The policy: an attention kernel's outputs are saved (flash, memory-efficient, variable-length, SDPA's CPU
    path), everything else in the region is recomputed."""
    name = str(op)
    return CheckpointPolicy.MUST_SAVE if "attention" in name or "attn" in name else CheckpointPolicy.PREFER_RECOMPUTE


def recompute_attention_inputs(layer: nn.Module, policy=keeps_attention_outputs) -> None:
    """Run ``layer.self_attn`` under selective activation checkpointing with ``policy`` (in place; a layer wrapped
    already stays as it is). Meant for layers that keep their activations: a layer that recomputes its whole
    forward in backward gains nothing from it (:func:`restore_attention_inputs` takes it off)."""
    attn = layer.self_attn
    if _PLAIN in attn.__dict__:
        return
    forward = attn.forward

    def forward_recomputing_inputs(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, policy), **kwargs)

    attn.__dict__[_PLAIN] = attn.__dict__.get("forward")  # None: the class's forward
    attn.forward = forward_recomputing_inputs


def restore_attention_inputs(layer: nn.Module) -> bool:
    """Undo :func:`recompute_attention_inputs` on ``layer``; whether it had been wrapped."""
    attn = layer.self_attn
    if _PLAIN not in attn.__dict__:
        return False
    plain = attn.__dict__.pop(_PLAIN)
    if plain is None:
        del attn.forward
    else:
        attn.forward = plain
    return True
