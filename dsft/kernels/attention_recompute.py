"""A kept layer's attention inputs recomputed in backward, the attention kernel's outputs kept (an experiment for
issue 16, measured with ``benchmarks/train_throughput.py --recompute-attention-inputs``; not used by ``dsft train``).

A decoder layer that keeps its activations (``--keep-layers``) saves, for its attention, the query, key and value
the kernel reads: on DeepSeek-V2-Lite at 8,192 tokens likely the three [8,192 x 3,072] bf16 tensors, 144 MiB of
the ~0.6 GiB such a layer keeps, that its measured peak shows (by size:
``benchmarks/results/2026-12-02-h200-train-writer-grads.md``). They come from the layer's input through a few small
GEMMs (the query, latent and key/value projections, ~225 GFLOP at that size: ~0.3 ms on an H200 by estimate,
against ~3.8 ms for the layer's whole forward, derived from every layer recomputed vs every layer kept). Wrapped
here, the attention module runs under selective activation checkpointing: backward runs its projections again from
its input, while the outputs of the attention kernel itself (any op whose name says attention) are kept, so the
kernel does not run twice. Fewer bytes a kept layer, more layers kept under the same memory: whether that wins is
the benchmark's to say.
"""
from __future__ import annotations

from functools import partial
from typing import Any

from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts


def keeps_attention_outputs(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """The policy: an attention kernel's outputs are saved (flash, memory-efficient, variable-length, SDPA's CPU
    path), everything else in the region is recomputed."""
    name = str(op)
    return CheckpointPolicy.MUST_SAVE if "attention" in name or "attn" in name else CheckpointPolicy.PREFER_RECOMPUTE


def recompute_attention_inputs(layer: nn.Module, policy=keeps_attention_outputs) -> None:
    """Run ``layer.self_attn`` under selective activation checkpointing with ``policy`` (in place). Meant for layers
    that keep their activations: a layer that recomputes its whole forward in backward gains nothing from it."""
    attn = layer.self_attn
    forward = attn.forward

    def forward_recomputing_inputs(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, policy), **kwargs)

    attn.forward = forward_recomputing_inputs
