"""On a GPU training runs with variable-length flash attention where the model's key/value heads are as many as
its query heads, flex attention otherwise (packed rows skip the blocks outside each example), and SDPA without
cuDNN (its masked backward NaN, pytorch#196678); the model's own settings come back after."""
from __future__ import annotations

import pytest
import torch
import transformers

from dsft.base.presets import PRESETS
from dsft.errors import UsageError
from dsft.kernels import varlen
from dsft.kernels.attention import attention_as, training_attention, training_implementation


def _tiny(name: str = "tiny-deepseek-v2"):
    config = PRESETS[name].make_config(400)
    config._attn_implementation = "sdpa"
    return transformers.AutoModelForCausalLM.from_config(config)


def test_flex_attention_trains_on_cuda_and_the_model_gets_sdpa_back(monkeypatch):
    monkeypatch.delenv("DSFT_ATTENTION", raising=False)
    monkeypatch.delenv("DSFT_SDPA_CUDNN", raising=False)
    model = _tiny()
    torch.backends.cuda.enable_cudnn_sdp(True)
    with training_attention(model, "cuda") as impl:
        assert impl == "flex_attention" == model.config._attn_implementation
        assert model.model.layers[0].self_attn.config._attn_implementation == "flex_attention"
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled()  # the other SDPA kernels stay available
    assert model.config._attn_implementation == "sdpa"
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_an_evaluation_inside_training_runs_with_the_models_own_attention(monkeypatch):
    """``eval_every``'s held-out losses between two steps: the model's attention inside, the training one after."""
    monkeypatch.delenv("DSFT_ATTENTION", raising=False)
    model = _tiny()
    with training_attention(model, "cuda"):
        with attention_as(model, "sdpa"):
            assert model.model.layers[0].self_attn.config._attn_implementation == "sdpa"
        assert model.config._attn_implementation == "flex_attention"
        with attention_as(model, None):  # None: as it is
            assert model.config._attn_implementation == "flex_attention"
    assert model.config._attn_implementation == "sdpa"


def test_cpu_training_keeps_the_models_attention():
    model = _tiny()
    with training_attention(model, "cpu") as impl:
        assert impl == "sdpa"


def test_dsft_attention_sdpa_keeps_sdpa_and_dsft_sdpa_cudnn_lets_cudnn_back_in(monkeypatch):
    monkeypatch.setenv("DSFT_ATTENTION", "sdpa")
    monkeypatch.setenv("DSFT_SDPA_CUDNN", "1")
    model = _tiny()
    torch.backends.cuda.enable_cudnn_sdp(True)
    with training_attention(model, "cuda") as impl:
        assert impl == "sdpa"
        assert torch.backends.cuda.cudnn_sdp_enabled()


def test_an_architecture_without_flex_support_keeps_sdpa(monkeypatch):
    monkeypatch.delenv("DSFT_ATTENTION", raising=False)
    model = _tiny()
    monkeypatch.setattr(type(model), "_supports_flex_attn", False)
    assert training_implementation(model, "cuda") is None


def test_an_unknown_dsft_attention_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("DSFT_ATTENTION", "flash")
    with pytest.raises(UsageError, match="DSFT_ATTENTION='flash'.*flex_attention.*sdpa"):
        training_implementation(_tiny(), "cuda")


def test_varlen_trains_models_whose_key_heads_equal_their_query_heads(monkeypatch):
    monkeypatch.delenv("DSFT_ATTENTION", raising=False)
    monkeypatch.setattr(varlen, "kernel_available", lambda: True)
    model = _tiny("tiny-deepseek-v2")  # MLA: 4 query heads, 4 key/value heads after the expansion
    with training_attention(model, "cuda") as impl:
        assert impl == varlen.VARLEN == model.model.layers[0].self_attn.config._attn_implementation
    assert model.config._attn_implementation == "sdpa"
    assert training_implementation(_tiny("tiny-qwen3-moe"), "cuda") == "flex_attention"  # 4 query heads, 2 key heads
    model.config.attention_dropout = 0.1  # (the kernel has none)
    assert training_implementation(model, "cuda") == "flex_attention"
    model.config.attention_dropout = 0.0
    model.config.sliding_window = 64  # (nor a window)
    assert training_implementation(model, "cuda") == "flex_attention"
    model.config.sliding_window = None
    monkeypatch.setattr(varlen, "kernel_available", lambda: False)  # a torch without the kernel
    assert training_implementation(model, "cuda") == "flex_attention"


def test_dsft_attention_picks_varlen_or_flex_whatever_the_heads(monkeypatch):
    monkeypatch.setattr(varlen, "kernel_available", lambda: True)
    monkeypatch.setenv("DSFT_ATTENTION", "varlen")
    assert training_implementation(_tiny("tiny-qwen3-moe"), "cuda") == varlen.VARLEN
    monkeypatch.setenv("DSFT_ATTENTION", "flex_attention")
    assert training_implementation(_tiny("tiny-deepseek-v2"), "cuda") == "flex_attention"
