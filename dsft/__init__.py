"""dsft: domain-specialised fine-tuning for Mixture-of-Experts language models.

The Python API the CLI is built on::

    import dsft
    result = dsft.train(domain="finance")           # -> TrainResult(adapter="finance@0.1.0", path, metrics)
    base = dsft.load_base("tiny-deepseek-v2")        # RuntimeBase: model, tokenizer, fingerprint + adapters
    base.attach("finance@0.1.0"); base.generate("...", adapter="finance")
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from dsft.errors import DsftError

# bitsandbytes' CPU backend warns on import (PEFT imports it whenever it is installed) that an optional gemv
# kernel package is missing; dsft never uses that kernel.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__version__ = "0.1.0"
__all__ = ["DsftError", "train", "load_base", "open_registry", "__version__"]

if TYPE_CHECKING:
    from dsft.recipes.runner import train
    from dsft.registry import open_registry
    from dsft.runtime.base import load_base


def __getattr__(name: str) -> Any:
    # Lazy: `import dsft` stays cheap (no torch import) for the CLI's --help and the registry.
    if name == "train":
        from dsft.recipes.runner import train

        return train
    if name == "load_base":
        from dsft.runtime.base import load_base

        return load_base
    if name == "open_registry":
        from dsft.registry import open_registry

        return open_registry
    raise AttributeError(name)
