"""Runtime fixtures: one $DSFT_HOME with three synthetic domain adapters (and a second finance version),
shared by the runtime tests; torch on one thread (the CI machine has two cores shared with other jobs)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

TEXTS = [
    "The collateralized debt obligation desk reviewed its duration risk.",
    "The court granted habeas corpus because",
    "Patients with myocardial infarction were",
    "A short note about the museum",
]


@pytest.fixture(scope="package", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="package")
def rt_home(tmp_path_factory, new_home) -> Path:
    """$DSFT_HOME for the runtime tests, sharing the session's built presets."""
    home = new_home(tmp_path_factory.mktemp("runtime_home"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DSFT_HOME", str(home))
        mp.delenv("DSFT_REGISTRY_URL", raising=False)
        yield home


@pytest.fixture(scope="package")
def refs(rt_home) -> dict[str, str]:
    """finance@0.1.0, legal@0.1.0, medical@0.1.0 and finance@0.2.0: random LoRA on every target group + terms."""
    from dsft.base import load_base
    from dsft.testing.adapters import make_adapter

    loaded = load_base("tiny-deepseek-v2", device="cpu")
    out = {}
    for i, domain in enumerate(["finance", "legal", "medical"]):
        out[domain] = make_adapter(loaded, domain, seed=i + 1).ref
    out["finance2"] = make_adapter(loaded, "finance", seed=7).ref
    return out


@pytest.fixture(scope="package")
def attached(refs):
    """One runtime with finance@0.1.0, legal and medical attached (tests must leave it that way)."""
    from dsft.runtime import load_base

    base = load_base("tiny-deepseek-v2", device="cpu")
    for key in ("finance", "legal", "medical"):
        base.attach(refs[key])
    return base


@pytest.fixture(scope="package")
def alone(refs):
    """A runtime per adapter with only that adapter attached (and one with none): the references."""
    from dsft.runtime import load_base

    out = {}
    for key in ("finance", "legal", "medical", None):
        base = load_base("tiny-deepseek-v2", device="cpu")
        if key is not None:
            base.attach(refs[key])
        out[key] = base
    return out


@pytest.fixture(scope="package")
def texts() -> list[str]:
    return list(TEXTS)


def in_background(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)`` on a daemon thread: (its Future, the thread). What ``fn`` raises is the Future's."""
    import threading
    from concurrent.futures import Future

    answer: Future = Future()

    def work():
        try:
            answer.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the test through the Future
            answer.set_exception(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return answer, thread
