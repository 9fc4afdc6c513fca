"""Shared fixtures: an isolated $DSFT_HOME per test, with the presets built once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    """One $DSFT_HOME for the whole session: presets are built here once."""
    home = tmp_path_factory.mktemp("dsft_home")
    os.environ["DSFT_HOME"] = str(home)
    return home


@pytest.fixture
def home(tmp_path, session_home, monkeypatch) -> Path:
    """A fresh $DSFT_HOME for one test (empty registry and adapters) sharing the session's built presets."""
    h = tmp_path / "home"
    h.mkdir()
    (session_home / "bases").mkdir(exist_ok=True)
    (h / "bases").symlink_to(session_home / "bases")
    monkeypatch.setenv("DSFT_HOME", str(h))
    monkeypatch.delenv("DSFT_REGISTRY_URL", raising=False)
    return h


@pytest.fixture(scope="session")
def tiny_base_dir(session_home) -> Path:
    from dsft.base import build_preset

    return build_preset("tiny-deepseek-v2")
