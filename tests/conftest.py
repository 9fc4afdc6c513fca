"""Shared fixtures: an isolated $DSFT_HOME per test, with the presets built once per session."""
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
def new_home(session_home):
    """Make a fresh $DSFT_HOME directory (empty registry and adapters) sharing the session's built presets.

    The one way tests get a home: ``home`` per test, and the runtime and serve packages one per package.
    """
    def make(directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (session_home / "bases").mkdir(exist_ok=True)
        (directory / "bases").symlink_to(session_home / "bases")
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
