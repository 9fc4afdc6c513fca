"""The registry decides from manifests and fingerprints: it must never pull in torch or the model code."""
from __future__ import annotations

import subprocess
import sys


def test_registry_and_its_cli_import_no_model_code() -> None:
    code = (
        "import sys\n"
        "import dsft.registry, dsft.cli.registry_cmd\n"
        "from dsft.registry import open_registry\n"
        "open_registry().list_adapters()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'peft')\n"
        "             or m.startswith(('dsft.adapters', 'dsft.kernels', 'dsft.base')))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
