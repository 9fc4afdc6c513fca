"""Presets are real transformers MoE classes, built deterministically into an ordinary model directory."""
from __future__ import annotations

import json

import pytest

from dsft.base import ARCHITECTURES, PRESETS, build_preset, fingerprint_for, load_base
from dsft.base.fingerprint import compute_fingerprint
from dsft.errors import NotFoundError, UnsupportedModelError


@pytest.mark.parametrize("name, cls", [("tiny-deepseek-v2", "DeepseekV2ForCausalLM"),
                                       ("tiny-qwen3-moe", "Qwen3MoeForCausalLM"),
                                       ("tiny-mixtral", "MixtralForCausalLM")])
def test_preset_loads_as_its_real_class(home, name, cls):
    base = load_base(name, device="cpu")
    assert type(base.model).__name__ == cls
    assert base.spec.architecture == cls
    n_params = sum(p.numel() for p in base.model.parameters())
    assert 1e6 < n_params < 10e6, n_params
    # an ordinary Hugging Face directory: config, safetensors weights, tokenizer
    files = {p.name for p in base.ref.path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)


def test_tiny_deepseek_v2_has_mla_dense_first_layer_and_shared_plus_routed_experts(home):
    model = load_base("tiny-deepseek-v2", device="cpu").model
    cfg = model.config
    assert cfg.kv_lora_rank and cfg.first_k_dense_replace == 1
    assert cfg.n_routed_experts >= 8 and cfg.num_experts_per_tok == 2 and cfg.n_shared_experts >= 1
    layers = model.model.layers
    assert not hasattr(layers[0].mlp, "experts")
    assert layers[1].mlp.experts.gate_up_proj.dim() == 3 and hasattr(layers[1].mlp, "shared_experts")


def test_preset_build_is_deterministic(home, tmp_path, monkeypatch):
    first = compute_fingerprint(build_preset("tiny-deepseek-v2"))
    monkeypatch.setenv("DSFT_HOME", str(tmp_path / "other"))
    second = compute_fingerprint(build_preset("tiny-deepseek-v2"))
    assert first["id"] == second["id"]
    assert first["tokenizer_hash"] == second["tokenizer_hash"] and first["weights_hash"] == second["weights_hash"]


def test_fingerprint_is_cached_and_names_architecture(home):
    name, source, fp = fingerprint_for("tiny-deepseek-v2")
    assert (name, source) == ("tiny-deepseek-v2", "preset:tiny-deepseek-v2")
    assert fp["architecture"] == "DeepseekV2ForCausalLM"
    assert fp["param_shapes"]["model.layers.1.mlp.experts.gate_up_proj"][0] == 8
    assert (home / "bases" / "tiny-deepseek-v2" / "dsft_fingerprint.json").exists()


def test_local_directory_goes_through_the_same_path(home, tiny_base_dir):
    base = load_base(str(tiny_base_dir), device="cpu")
    assert base.ref.source.startswith("path:")
    assert base.fingerprint["id"] == fingerprint_for("tiny-deepseek-v2")[2]["id"]


def test_non_moe_model_is_refused_with_the_supported_list(home, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(d)
    with pytest.raises(UnsupportedModelError) as err:
        load_base(str(d), device="cpu")
    msg = str(err.value)
    assert "LlamaForCausalLM" in msg and all(spec.architecture in msg for spec in ARCHITECTURES.values())


def test_missing_directory_and_unknown_names_are_clear(home, tmp_path):
    with pytest.raises(NotFoundError, match="does not exist"):
        load_base(str(tmp_path / "nope"), device="cpu")
    with pytest.raises(NotFoundError, match="unknown base"):
        load_base("tiny-nonsense", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="no config.json"):
        load_base(str(tmp_path / "empty"), device="cpu")


def test_lite_shape_preset_matches_the_public_config_without_building_it():
    cfg = PRESETS["deepseek-v2-lite-shape"].make_config(4096)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.n_routed_experts, cfg.n_shared_experts,
            cfg.num_experts_per_tok, cfg.vocab_size) == (27, 2048, 64, 2, 6, 102400)
    assert json.loads(cfg.to_json_string())["model_type"] == "deepseek_v2"
    assert not PRESETS["deepseek-v2-lite-shape"].cpu_ok  # never built by CPU tests
