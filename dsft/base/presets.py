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
PRETRAIN_STEPS = 40


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model_class: str
    """transformers class name (imported when the preset is built, so listing presets stays cheap)."""
    make_config: Callable[[int], Any]
    """Builds the config from the tokenizer's size (the vocabulary is the only data-dependent field)."""
    cpu_ok: bool = True
    random_weights: bool = False
    """Weights generated when loaded (:class:`dsft.base.shard_load.RandomWeights`), never written: the directory
    holds the config and tokenizer only. For shapes too large to build whole in one process, or to store."""
    pretrain_steps: int = 0
    """Steps of full-parameter training on the bundled general corpus at build time, so that the base
    is a language model (and forgetting is measurable) rather than random weights."""


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


def _glm_4_5_air_shape(vocab: int) -> Any:
    from transformers import Glm4MoeConfig

    # The public GLM-4.5-Air config (zai-org/GLM-4.5-Air: 46 layers, 128 routed + 1 shared experts, top-8; ~106B
    # parameters without its multi-token-prediction layer, which transformers does not build): 213 GB in bf16, more
    # than one H200 (141 GB). Only the weights are random; the vocabulary stays the real one (dsft's tokenizer uses 4k ids).
    return Glm4MoeConfig(
        vocab_size=151552, hidden_size=4096, intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=46,
        num_attention_heads=96, num_key_value_heads=8, head_dim=128, attention_bias=True, partial_rotary_factor=0.5,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, n_routed_experts=128, n_shared_experts=1,
        num_experts_per_tok=8, first_k_dense_replace=1, norm_topk_prob=True, routed_scaling_factor=1.0, n_group=1,
        topk_group=1, use_qk_norm=False, max_position_embeddings=131072, rms_norm_eps=1e-5, initializer_range=0.02,
        tie_word_embeddings=False, eos_token_id=0, bos_token_id=0, pad_token_id=1,
    )


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny-deepseek-v2", "DeepseekV2ForCausalLM, MLA, 1 dense + 3 MoE layers, 8 routed top-2 + 1 shared", "DeepseekV2ForCausalLM", _tiny_deepseek_v2, pretrain_steps=PRETRAIN_STEPS),
        Preset("tiny-qwen3-moe", "Qwen3MoeForCausalLM, 4 MoE layers, 8 experts top-2", "Qwen3MoeForCausalLM", _tiny_qwen3_moe, pretrain_steps=PRETRAIN_STEPS),
        Preset("tiny-mixtral", "MixtralForCausalLM, 4 MoE layers, 8 experts top-2", "MixtralForCausalLM", _tiny_mixtral, pretrain_steps=PRETRAIN_STEPS),
        Preset("deepseek-v2-lite-shape", "DeepSeek-V2-Lite config (27 layers, 64+2 experts, top-6) with random weights; GPU only", "DeepseekV2ForCausalLM", _deepseek_v2_lite_shape, cpu_ok=False),
        Preset("glm-4.5-air-shape", "GLM-4.5-Air config (106B parameters, 213 GB in bf16: 46 layers, 128+1 experts, top-8) with "
               "weights generated on load; GPU only, more than one GPU (dsft train --num-gpus 2)", "Glm4MoeForCausalLM",
               _glm_4_5_air_shape, cpu_ok=False, random_weights=True),
    )
}
DEFAULT_BASE = "tiny-deepseek-v2"


def preset_dir(name: str) -> Path:
    return bases_dir() / name


def build_preset(name: str, device: str | None = None) -> Path:
    """Build preset ``name`` into ``$DSFT_HOME/bases/<name>/`` unless it is there; return the directory.

    The build is deterministic (fixed seed, tokenizer trained on the bundled corpora) and atomic:
    the directory appears complete or not at all. Concurrent builders (two first runs on a fresh
    machine, parallel test workers) take turns on a lock file: the second finds the first's copy.
    """
    from filelock import FileLock

    final = preset_dir(name)
    if (final / "config.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{name}.lock")):
        if not (final / "config.json").exists():
            _build(name, final, device)
    return final


def _build(name: str, final: Path, device: str | None) -> None:
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    from dsft.base.fingerprint import compute_fingerprint, save_fingerprint
    from dsft.base.tokenizer import train_bpe
    from dsft.domains import corpus_text_for_tokenizer

    hf_logging.disable_progress_bar()
    preset = PRESETS[name]
    tokenizer = train_bpe(corpus_text_for_tokenizer(seed=SEED), TOKENIZER_VOCAB)
    config = preset.make_config(len(tokenizer))
    if preset.random_weights:
        _build_random(config, preset.model_class, tokenizer, final)
        return
    torch.manual_seed(SEED)
    big = not preset.cpu_ok
    init_device = device or ("cuda" if big and torch.cuda.is_available() else "cpu")
    with torch.device(init_device):
        # The benchmark-sized preset is born in bf16 (31 GB instead of 63 GB in fp32).
        model = getattr(transformers, preset.model_class)._from_config(config, dtype=torch.bfloat16 if big else torch.float32)
    model.generation_config.pad_token_id = config.pad_token_id
    if preset.pretrain_steps:
        pretrain(model, tokenizer, preset.pretrain_steps)
    with staging_dir(final) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_fingerprint(tmp, compute_fingerprint(tmp))
        try:
            publish_dir(tmp, final)
        except FileExistsError:  # built meanwhile by a process that took no lock (an older dsft): identical
            shutil.rmtree(tmp, ignore_errors=True)


def _build_random(config: Any, architecture: str, tokenizer: Any, final: Path) -> None:
    """A preset whose weights are generated on load: config.json (tagged with the init and seed) and the tokenizer."""
    import json

    from transformers import GenerationConfig

    from dsft.base.fingerprint import compute_fingerprint, save_fingerprint
    from dsft.base.shard_load import preset_config

    with staging_dir(final) as tmp:
        (tmp / "config.json").write_text(json.dumps(preset_config(config, SEED, architecture), indent=2))
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_fingerprint(tmp, compute_fingerprint(tmp))
        try:
            publish_dir(tmp, final)
        except FileExistsError:
            shutil.rmtree(tmp, ignore_errors=True)


def pretrain(model, tokenizer, steps: int, batch_size: int = 8, seq_len: int = 128, lr: float = 3e-3) -> list[float]:
    """Briefly pre-train a freshly initialised preset on the general corpus (full parameters, fp32, CPU).

    A few dozen steps take the loss from ~8.3 (uniform over 4k tokens) to ~3: enough for the base to
    model English-like text, so that domain training has something to improve on and something to
    forget. Fixed seed and data order; returns the losses.
    """
    import math

    import torch

    from dsft.data.files import Record
    from dsft.data.tokenize import build_examples
    from dsft.domains import general_pack, generate_corpus

    texts = generate_corpus(general_pack(), seed=SEED).raw_train
    ex = build_examples(tokenizer, [Record.raw(t) for t in texts], seq_len)
    g = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(ex), generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    losses = []
    for step in range(steps):
        idx = order[(torch.arange(batch_size) + step * batch_size) % len(ex)]
        ids = ex.input_ids[idx]
        for group in optimizer.param_groups:  # linear warm-up, cosine decay
            group["lr"] = lr * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = model(input_ids=ids, labels=ex.labels[idx], attention_mask=ex.attention_mask[idx]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses
