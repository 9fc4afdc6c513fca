"""The real server: `dsft serve` in a child process on a free local port, with three adapters attached
and an API key; tests talk to it over HTTP only."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key-123"


@pytest.fixture(scope="package")
def serve_home(tmp_path_factory, new_home) -> Path:
    """$DSFT_HOME of the server and of the adapters made for it (tests/conftest.py's ``new_home``)."""
    return new_home(tmp_path_factory.mktemp("serve_home"))


@contextlib.contextmanager
def making_adapters(home: Path):
    """The tiny base, loaded with $DSFT_HOME ``home`` (one torch thread, no registry URL from the environment):
    adapters made with it (:func:`dsft.testing.adapters.make_adapter`) register in ``home``'s registry."""
    import torch

    from dsft.base import load_base

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DSFT_HOME", str(home))
            mp.delenv("DSFT_REGISTRY_URL", raising=False)
            yield load_base("tiny-deepseek-v2", device="cpu")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="package")
def serve_refs(serve_home) -> dict[str, str]:
    """finance, legal, medical @0.1.0 (attached at start), finance@0.2.0 and an incompatible one (not attached)."""
    from dsft.testing.adapters import make_adapter

    with making_adapters(serve_home) as loaded:
        refs = {d: make_adapter(loaded, d, seed=i + 1).ref for i, d in enumerate(["finance", "legal", "medical"])}
        refs["finance2"] = make_adapter(loaded, "finance", seed=9).ref
        other = dict(loaded.fingerprint, tokenizer_hash="0" * 64, id="2" * 64)
        refs["incompatible"] = make_adapter(loaded, "retokenized", terms=["habeas corpus"], fingerprint=other,
                                            base_name="other-base").ref
    return refs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(home: Path, *extra: str, command: str = "serve", api_key: str | None = API_KEY,
                   ready: str = "/health"):
    """`dsft COMMAND` (``serve`` or ``ui``) with ``extra`` arguments in a child process on a free port, its
    $DSFT_HOME ``home`` and ``api_key``; yields its base URL once ``ready`` answers 200 (its output goes to
    ``home/server.log``)."""
    port = _free_port()
    env = {**os.environ, "DSFT_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("DSFT_REGISTRY_URL", None)
    env.pop("DSFT_API_KEY", None)
    if api_key:
        env["DSFT_API_KEY"] = api_key
    args = [sys.executable, "-m", "dsft.cli", command, "--port", str(port), *extra]
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"dsft {command} exited with {proc.returncode}:\n{(home / 'server.log').read_text()}")
            try:
                if httpx.get(f"{url}{ready}", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"dsft {command} did not come up:\n{(home / 'server.log').read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture(scope="package")
def server(serve_home, serve_refs):
    """Base URL of a running `dsft serve` (stopped at the end of the package); its JSON access log goes to
    ``serve_home/access.log``."""
    args = ["--batch-wait-ms", "50", "--max-tokens", "256", "--access-log", str(serve_home / "access.log")]
    for key in ("finance", "legal", "medical"):
        args += ["--adapter", serve_refs[key]]
    with running_server(serve_home, *args) as url:
        yield url


@pytest.fixture
def api_key() -> str:
    return API_KEY


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as c:
        yield c
