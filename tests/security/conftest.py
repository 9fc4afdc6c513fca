"""Security tests: hostile or careless input to the real ``dsft`` command, in this process (no import cost per case)."""
from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest


@pytest.fixture
def dsft(home) -> Callable[..., subprocess.CompletedProcess]:
    """Run ``dsft ARGS`` in this process against the test's $DSFT_HOME; returns code, stdout and stderr."""
    from typer.testing import CliRunner

    from dsft.cli.main import app

    def run(*args: str) -> subprocess.CompletedProcess:
        result = CliRunner().invoke(app, list(args))
        return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)

    return run


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line a refused command prints (asserting there is exactly one, and no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]
