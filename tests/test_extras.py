"""Optional dependencies: a missing one is a one-line error naming the extra to install."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dsft import extras
from dsft.errors import UsageError


def test_a_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(extras.EXTRAS, "serve", ("json", "dsft_no_such_module"))
    with pytest.raises(UsageError, match=r"dsft serve needs dsft_no_such_module.*pip install 'dsft\[serve\]'"):
        extras.require("serve", "dsft serve")


def test_an_installed_extra_is_imported():
    assert [m.__name__ for m in extras.require("serve", "dsft serve")] == ["fastapi", "uvicorn", "prometheus_client"]


def test_the_cli_starts_without_the_serve_extra():
    code = "import sys, dsft.cli.main; print(sorted({'fastapi', 'uvicorn', 'bitsandbytes'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_extras_match_pyproject():
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    declared = project["optional-dependencies"]
    for extra, modules in extras.EXTRAS.items():
        assert [d.split(">")[0].split("=")[0] for d in declared[extra]] == list(modules)
        assert not any(d.startswith(modules) for d in project["dependencies"])
