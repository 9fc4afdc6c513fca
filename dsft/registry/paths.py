"""Adapter paths as the registry stores them: relative to ``$DSFT_HOME`` when inside it, so a copied or
moved home keeps using its own files (not the original's); absolute otherwise."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from dsft.home import dsft_home


def to_stored(path: str | Path, home: Path | None = None) -> str:
    """The text stored for ``path``: ``adapters/finance/0.1.0`` for a directory in the home, else the absolute path."""
    home = Path(os.path.realpath(home or dsft_home()))
    absolute = Path(os.path.realpath(Path(path).expanduser()))
    try:
        return absolute.relative_to(home).as_posix()
    except ValueError:
        return str(absolute)


def from_stored(stored: str, home: Path | None = None) -> str:
    """The absolute path a stored one names (a relative one is under the current ``$DSFT_HOME``)."""
    if os.path.isabs(stored):
        return stored
    return str((home or dsft_home()) / PurePosixPath(stored))
