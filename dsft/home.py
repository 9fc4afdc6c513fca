"""Where dsft keeps its state: ``$DSFT_HOME`` (default ``~/.dsft``) with ``registry.db``, ``bases/``, ``adapters/``."""
from __future__ import annotations

import os
from pathlib import Path


def dsft_home() -> Path:
    """The state directory, created on first use."""
    home = Path(os.environ.get("DSFT_HOME") or Path.home() / ".dsft").expanduser()
    home.mkdir(parents=True, exist_ok=True)
    return home


def bases_dir() -> Path:
    return dsft_home() / "bases"


def adapters_dir() -> Path:
    return dsft_home() / "adapters"


def registry_url() -> str:
    """``DSFT_REGISTRY_URL`` if set, else SQLite at ``$DSFT_HOME/registry.db``."""
    return os.environ.get("DSFT_REGISTRY_URL") or f"sqlite:///{dsft_home() / 'registry.db'}"
