"""torch.compile per decoder layer: what makes the fast path fast on a GPU.

Compiling each layer (not the whole model) keeps compile time to one layer's worth (the layers
share code and shapes, so one graph serves all) and composes with activation checkpointing.
"""
from __future__ import annotations

KEPT_MEMORY_BUDGET = 0.8
"""``torch._functorch.config.activation_memory_budget`` when some layers keep their activations: the compiler's
partitioner then recomputes the cheapest of what a layer would save (pointwise work, fused into backward kernels)
until it keeps 80% of it. Lite shape, 4 x 2048, every layer kept, H200 (2026-12-02, ``-train-memory-budget.md``):
55.2 -> 51.1 GiB for 29,179 -> 29,031 tokens/s (-0.5%); 0.6 recomputes GEMMs (23,845 tokens/s)."""


def compile_decoder_layers(model, memory_budget: float | None = None) -> int:
    """Compile every decoder layer of ``model`` (a transformers model or a PeftModel) in place. ``memory_budget``:
    the share of a layer's activations the compiled backward keeps (the rest recomputed); None: all of them, the
    compiler's own choice (fastest). It is a process-wide compiler setting, read when a layer first compiles."""
    import torch._dynamo as dynamo
    import torch._functorch.config as functorch_config

    # One graph per layer index guard would blow the default cache on 27+ layers.
    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 128)
    dynamo.config.accumulated_cache_size_limit = max(dynamo.config.accumulated_cache_size_limit, 1024)
    functorch_config.activation_memory_budget = 1.0 if memory_budget is None else memory_budget
    if memory_budget is not None:
        from dsft.kernels.flops import register_flop_formulas

        register_flop_formulas()  # so that the budget recomputes cheap work, not GEMMs it cannot price
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.get_decoder().layers
    for layer in layers:
        layer.compile()
    return len(layers)

