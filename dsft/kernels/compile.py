"""torch.compile per decoder layer: what makes the fast path fast on a GPU.

Compiling each layer (not the whole model) keeps compile time to one layer's worth (the layers
share code and shapes, so one graph serves all) and composes with activation checkpointing.
"""
from __future__ import annotations


def compile_decoder_layers(model) -> int:
    """Compile every decoder layer of ``model`` (a transformers model or a PeftModel) in place."""
    import torch._dynamo as dynamo

    # One graph per layer index guard would blow the default cache on 27+ layers.
    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 128)
    dynamo.config.accumulated_cache_size_limit = max(dynamo.config.accumulated_cache_size_limit, 1024)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = base.get_decoder().layers
    for layer in layers:
        layer.compile()
    return len(layers)

