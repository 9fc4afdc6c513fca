"""Checks of ``dsft train``'s arguments that run before any weights load: each bad value is one line.

Pure decisions over plain values (the registry is asked only for where adapters live and which paths
are registered), so the rules are testable without a model.
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dsft.errors import UsageError, show

MAX_SEED = 2**32 - 1
"""numpy's seeds are 32-bit; torch's and Python's accept more, but one range for all three keeps runs reproducible."""
DEVICE_TYPES = ("cpu", "cuda")


def check_max_steps(max_steps: int | None) -> None:
    """``--max-steps`` caps every stage; 0 or less would train nothing (or, read as "no cap", everything)."""
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
        raise UsageError(f"--max-steps must be >= 1 (leave it out to train every stage in full), got {show(max_steps)}")


def check_seed(seed: int | None, where: str = "--seed") -> None:
    """A seed every random generator dsft seeds accepts (0..2^32-1)."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise UsageError(f"{where} must be an integer in 0..{MAX_SEED}, got {show(seed, 40)}")


def check_device(device: str | None) -> None:
    """``--device``: cpu, cuda or cuda:N (None: the default)."""
    if device is None:
        return
    kind, _, index = str(device).partition(":")
    if kind not in DEVICE_TYPES or (index and not (kind == "cuda" and index.isdigit())):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {show(device, 40)}")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                             "use --device cpu")
        if index and int(index) >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def check_optimizer(optimizer: str, sharding: str) -> None:
    """The recipe's ``optimizer`` can run here: ``adamw8bit`` needs bitsandbytes and unsharded tensors (its
    8-bit moment blocks cannot be FSDP2 shards)."""
    if optimizer != "adamw8bit":
        return
    from dsft.extras import require
    from dsft.kernels.optim import NO_8BIT_SHARDS

    require("qlora", "optimizer: adamw8bit")
    if sharding == "fsdp":
        raise UsageError(NO_8BIT_SHARDS)


def check_seq_len(seq_lens: Iterable[tuple[str, int]], config: dict[str, Any], base: str) -> None:
    """Every stage's ``seq_len`` fits the base's context (``max_position_embeddings``).

    Args:
        seq_lens: (dotted field, value) pairs, e.g. ``("stages[0].seq_len", 256)``.
        config: the base's config.json.
        base: the base's name, for the message.
    """
    context = config.get("max_position_embeddings")
    if not isinstance(context, int) or context <= 0:
        return  # a config without it: the model itself is the judge
    for where, n in seq_lens:
        if n > context:
            raise UsageError(f"{where}: must be <= {context} (the context length of base {show(base, 60)}), got {n}")


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def check_output(output: Path | None, adapters_root: Path, registered: Iterable[str]) -> None:
    """``--output`` is a new place: never inside the registry's adapter store nor a registered adapter's directory.

    The finished adapter is copied there, so a registered version under it would be overwritten.

    Args:
        output: the ``--output`` directory (None: not given).
        adapters_root: where the registry keeps adapter directories.
        registered: the directories of every registered adapter version.
    Raises:
        UsageError: ``output`` is inside the store or a registered directory, or holds one.
    """
    if output is None:
        return
    out = Path(os.path.realpath(Path(output).expanduser()))
    root = Path(os.path.realpath(adapters_root))
    if _inside(out, root) or _inside(root, out):
        raise UsageError(f"--output {show(str(output), 120)} is inside the registry's adapter store ({root}); "
                         "registered adapters live there: choose a directory outside it")
    for path in registered:
        p = Path(os.path.realpath(path))
        if _inside(out, p) or _inside(p, out):
            raise UsageError(f"--output {show(str(output), 120)} would overwrite the registered adapter in {p}; "
                             "choose a new directory")
