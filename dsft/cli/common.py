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
