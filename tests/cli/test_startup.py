"""The CLI starts without importing torch: ``dsft --help``, ``dsft registry list`` and the other commands that
read no weights answer in about a second; a command imports torch when it runs, not when ``dsft`` loads."""
from __future__ import annotations

import subprocess
import sys


def test_loading_the_cli_leaves_torch_unimported():
    code = "import sys, dsft.cli.main; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
