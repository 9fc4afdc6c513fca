"""Refuse a model directory that asks to run its own Python code, unless the user trusts it.

A ``config.json`` or ``tokenizer_config.json`` with an ``auto_map`` entry tells transformers to import a
``.py`` file from the model directory (``trust_remote_code``). Every architecture dsft supports is
native to transformers, so such a directory is refused here, before any ``from_pretrained`` can
prompt on a terminal or import anything; ``--trust-remote-code`` lets it through, and the flag is then
passed to every ``from_pretrained`` explicitly (see :func:`hf_kwargs`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsft.errors import UsageError

CODE_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")
"""The files through which transformers' Auto classes pick up code from the model directory."""


def files_asking_for_code(model_dir: Path) -> list[str]:
    """Names of the files in ``model_dir`` whose ``auto_map`` asks transformers to import the directory's code.

    A file that is not a JSON object is not read as one here (the loader reports it later).
    """
    asking = []
    for name in CODE_FILES:
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            asking.append(name)
    return asking


def refuse_remote_code(model_dir: Path, trust_remote_code: bool, what: str | None = None) -> None:
    """Raise unless ``model_dir`` asks for no code of its own or the user trusts it.

    Args:
        model_dir: the model directory.
        trust_remote_code: the user's ``--trust-remote-code``.
        what: how to name the base in the message (default: the directory).
    Raises:
        UsageError: a file of the directory carries ``auto_map`` and ``trust_remote_code`` is false.
    """
    if trust_remote_code:
        return
    asking = files_asking_for_code(model_dir)
    if asking:
        where = Path(model_dir) / asking[0]
        raise UsageError(f"{where} asks to run Python code from {what or model_dir} (auto_map); dsft ran none of it. "
                         "Remove auto_map, or pass --trust-remote-code if you trust its authors")


def hf_kwargs(trust_remote_code: bool) -> dict[str, Any]:
    """Keyword arguments every ``from_pretrained`` / ``from_config`` of a base gets: the user's flag, explicitly."""
    return {"trust_remote_code": bool(trust_remote_code)}
