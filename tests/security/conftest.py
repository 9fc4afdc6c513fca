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
