"""Built-in bases: real transformers MoE classes at small sizes, built once into ``$DSFT_HOME/bases/<name>/``.

A preset directory is an ordinary Hugging Face model directory, so presets and downloaded
checkpoints share one loading path (:mod:`dsft.base.loading`).
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsft.atomic import publish_dir, staging_dir
from dsft.home import bases_dir

TOKENIZER_VOCAB = 4096
SEED = 0


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model_class: str
    """transformers class name (imported when the preset is built, so listing presets stays cheap)."""
    make_config: Callable[[int], Any]
    """Builds the config from the tokenizer's size (the vocabulary is the only data-dependent field)."""
    cpu_ok: bool = True


def _tiny_deepseek_v2(vocab: int) -> Any:
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=vocab, hidden_size=128, intermediate_size=384, moe_intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16,
        topk_method="greedy", norm_topk_prob=False, max_position_embeddings=2048,
        tie_word_embeddings=False, eos_token_id=0, bos_token_id=0, pad_token_id=1,
    )


def _tiny_qwen3_moe(vocab: int) -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=384, moe_intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=2048,
        tie_word_embeddings=False, eos_token_id=0, bos_token_id=0, pad_token_id=1,
    )


def _tiny_mixtral(vocab: int) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
        max_position_embeddings=2048, tie_word_embeddings=False, eos_token_id=0, bos_token_id=0, pad_token_id=1,
    )


def _deepseek_v2_lite_shape(vocab: int) -> Any:
    from transformers import DeepseekV2Config

    # The public DeepSeek-V2-Lite config (15.7B total, 2.4B active); only the weights are random.
    return DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, q_lora_rank=None,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy",
        norm_topk_prob=False, max_position_embeddings=32768, tie_word_embeddings=False,
        eos_token_id=0, bos_token_id=0, pad_token_id=1,
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny-deepseek-v2", "DeepseekV2ForCausalLM, MLA, 1 dense + 3 MoE layers, 8 routed top-2 + 1 shared", "DeepseekV2ForCausalLM", _tiny_deepseek_v2),
        Preset("tiny-qwen3-moe", "Qwen3MoeForCausalLM, 4 MoE layers, 8 experts top-2", "Qwen3MoeForCausalLM", _tiny_qwen3_moe),
        Preset("tiny-mixtral", "MixtralForCausalLM, 4 MoE layers, 8 experts top-2", "MixtralForCausalLM", _tiny_mixtral),
        Preset("deepseek-v2-lite-shape", "DeepSeek-V2-Lite config (27 layers, 64+2 experts, top-6) with random weights; GPU only", "DeepseekV2ForCausalLM", _deepseek_v2_lite_shape, cpu_ok=False),
    )
}
DEFAULT_BASE = "tiny-deepseek-v2"


def preset_dir(name: str) -> Path:
    return bases_dir() / name


def build_preset(name: str, device: str | None = None) -> Path:
    """Build preset ``name`` into ``$DSFT_HOME/bases/<name>/`` unless it is there; return the directory.

    The build is deterministic (fixed seed, tokenizer trained on the bundled corpora) and atomic:
    the directory appears complete or not at all, and a concurrent builder's copy wins harmlessly.
    """
    import torch
    import transformers

    from dsft.base.fingerprint import compute_fingerprint, save_fingerprint
    from dsft.base.tokenizer import train_bpe
    from dsft.domains import corpus_text_for_tokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    final = preset_dir(name)
    if (final / "config.json").exists():
        return final
    preset = PRESETS[name]
    tokenizer = train_bpe(corpus_text_for_tokenizer(seed=SEED), TOKENIZER_VOCAB)
    config = preset.make_config(len(tokenizer))
    torch.manual_seed(SEED)
    big = not preset.cpu_ok
    init_device = device or ("cuda" if big and torch.cuda.is_available() else "cpu")
    with torch.device(init_device):
        # The benchmark-sized preset is born in bf16 (31 GB instead of 63 GB in fp32).
        model = getattr(transformers, preset.model_class)._from_config(config, dtype=torch.bfloat16 if big else torch.float32)
    model.generation_config.pad_token_id = config.pad_token_id
    with staging_dir(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_fingerprint(tmp, compute_fingerprint(tmp))
        try:
            publish_dir(tmp, final)
        except FileExistsError:  # someone else built it meanwhile: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return final
