"""Shared fixtures: an isolated $DSFT_HOME per test, with the presets built and their held-out figures measured
once per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    # Parallel workers (pytest -n N) share the cores: one torch thread each, in this process and the
    # `dsft` processes tests start, is faster than N x all cores fighting over them.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    """One $DSFT_HOME for the whole session: presets are built here once (once for all parallel
    workers: their homes link one bases directory, and build_preset takes turns on a lock)."""
    home = tmp_path_factory.mktemp("dsft_home")
    if XDIST_WORKER:
        shared = tmp_path_factory.getbasetemp().parent / "dsft_bases"
        shared.mkdir(exist_ok=True)
        (home / "bases").symlink_to(shared)
    os.environ["DSFT_HOME"] = str(home)
    return home


@pytest.fixture(scope="session")
def base_figures(session_home, tmp_path_factory) -> Path:
    """One held-out figures cache of the unmodified bases (``cache/base-heldout``, dsft/eval/base_cache.py) for
    the whole session, all parallel workers included. Measuring a base's held-out losses is over a third of a
    short test run's time (its few steps take under a second), and they depend only on the base version and
    the rows, which the cache's key holds; so each (base, held-out set) is measured once per session, not
    once per fresh home. tests/eval/test_evaluate.py tests the cache itself in a home of its own."""
    root = tmp_path_factory.getbasetemp().parent if XDIST_WORKER else session_home
    shared = root / "dsft_base_heldout"
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture(scope="session")
def new_home(session_home, base_figures):
    """Make a fresh $DSFT_HOME directory (empty registry and adapters) sharing the session's built presets and
    (unless ``share_base_figures=False``) their measured held-out figures (``base_figures``).

    The one way tests get a home: ``home`` per test, and the runtime and serve packages one per package.
    """
    def make(directory: Path, share_base_figures: bool = True) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (session_home / "bases").mkdir(exist_ok=True)
        (directory / "bases").symlink_to(session_home / "bases")
        if share_base_figures:
            (directory / "cache").mkdir()
            (directory / "cache" / "base-heldout").symlink_to(base_figures)
        return directory

    return make


@pytest.fixture
def home(tmp_path, new_home, monkeypatch) -> Path:
    """A fresh $DSFT_HOME for one test, set in the environment for its duration."""
    h = new_home(tmp_path / "home")
    monkeypatch.setenv("DSFT_HOME", str(h))
    monkeypatch.delenv("DSFT_REGISTRY_URL", raising=False)
    return h


@pytest.fixture(scope="session")
def tiny_base_dir(session_home) -> Path:
    from dsft.base import build_preset

    return build_preset("tiny-deepseek-v2")


@pytest.fixture
def tiny_deepseek_v3():
    """A small DeepseekV3ForCausalLM built from its config (sigmoid router with group-limited top-k, one dense
    layer, shared + routed experts), with router weights large enough that routing differs between tokens."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=400, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=2,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=128)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.3)
    return model


@pytest.fixture
def tiny_qwen2_moe():
    """A small Qwen2MoeForCausalLM built from its config: attention projections with biases, a gated shared expert."""
    import torch
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        vocab_size=400, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
        max_position_embeddings=128)
    torch.manual_seed(0)
    model = Qwen2MoeForCausalLM(cfg)
    with torch.no_grad():  # transformers initialises biases to zero; a bias that is not applied must show
        for name, p in model.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.5)
    return model


# Packages whose fixtures are package-scoped (tests/runtime/conftest.py, tests/serve/conftest.py): adapters made
# for them, loaded runtimes, a `dsft serve` child process. Under `pytest -n N --dist loadfile` each file goes to
# whichever worker is free, so a package's files landed on both workers and each built those fixtures again
# (a server start-up and the adapters, ~20 s of the two cores); sent to one worker as one unit, they are built once.
ONE_WORKER_PACKAGES = ("tests/runtime/", "tests/serve/")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class LoadFileKeepingPackagesTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return next((p for p in ONE_WORKER_PACKAGES if path.startswith(p)), path)

    return LoadFileKeepingPackagesTogether(config, log)
