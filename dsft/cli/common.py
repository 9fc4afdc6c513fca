"""What every command shares: the error boundary (DsftError -> one red line + exit code) and JSON output."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from dsft.errors import DsftError

err_console = Console(stderr=True)
MAX_MESSAGE = 2000
console = Console()


def debug_enabled() -> bool:
    return os.environ.get("DSFT_DEBUG") == "1"


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def fail(message: str, code: int = 1) -> None:
    """Print ``error: message`` on stderr and exit with ``code``.

    The message is plain text, never rich markup nor emoji codes: a name or path holding ``[/]`` or
    ``:x:`` is printed as given.
    """
    if len(message) > MAX_MESSAGE:  # a safety net; messages cut echoed values themselves (dsft.errors.show)
        message = f"{message[:MAX_MESSAGE]}... (message cut at {MAX_MESSAGE} of {len(message):,} characters)"
    line = Text("error:", style="bold red")
    line.append(" " + message)
    err_console.print(line, highlight=False, soft_wrap=True, emoji=False, markup=False)
    raise typer.Exit(code)


def guarded(fn: Callable) -> Callable:
    """Map dsft's errors to one line and an exit code; other exceptions too, unless --debug."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except DsftError as exc:
            if debug_enabled():
                raise
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted; nothing was registered", 130)
        except Exception as exc:  # an unexpected failure still gets one line; --debug shows the traceback
            if debug_enabled():
                raise
            fail(f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1)
    return wrapper


# --- user data options, shared by every command that reads --data --------------------------------

DATA_HELP = ("Your data: JSONL, JSON, CSV, Parquet or text files, directories of them, a datasets save_to_disk "
             "directory, or a hub dataset id already in the local Hugging Face cache. Repeatable; a shell glob works.")
FIELD_HELP = ("Read dsft's field from your column, e.g. --field response=answer (fields: text, prompt, response, "
              "instruction, input, output, system, messages, conversations). Repeatable.")
SPLIT_HELP = "Split to read from directories, saved datasets and hub datasets (a single file is read whole)."


def split_data_args(positional: list[str] | None, data: list[Any] | None) -> tuple[list[str], list[str]]:
    """Separate ``key.path=value`` overrides from data paths among the trailing arguments.

    A shell expands ``--data *.txt`` to ``--data a.txt b.txt``: the option takes ``a.txt`` and the
    rest arrive as positional arguments. Those without ``=`` are data when ``--data`` was given.

    Returns:
        ``(data, overrides)``.

    Raises:
        UsageError: a positional argument is neither an override nor follows ``--data``.
    """
    from dsft.errors import UsageError

    data_out = [str(d) for d in data or ()]
    overrides = []
    for arg in positional or ():
        if "=" in arg.split("/")[0]:
            overrides.append(arg)
        elif data_out:
            data_out.append(arg)
        else:
            raise UsageError(f"{arg!r} is not an override (key.path=value, e.g. stages.0.lr=2e-5); "
                             f"to train on it, pass --data {arg}")
    return data_out, overrides


def data_sources(data: list[Any] | None, fields: list[str] | None, split: str = "train") -> list:
    """``--data``/``--field``/``--split`` values -> :class:`dsft.data.source.DataSource` objects (globs expanded).

    Raises:
        UsageError: a bad ``--field`` or ``--split``; DataError: a glob that matches nothing.
    """
    from dsft.data.formats import parse_fields
    from dsft.data.source import as_sources

    return as_sources([str(d) for d in data or ()], split=split, fields=parse_fields(fields))
