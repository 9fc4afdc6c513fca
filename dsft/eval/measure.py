"""Measure what ``dsft plan`` estimates: the peak memory of a few real training steps.

The model is set up the way :func:`dsft.recipes.train` sets it up for each method (same loading,
term extension, LoRA attachment, gradient checkpointing on CUDA, optimizer groups, training loop and
chunked loss), then trained on random full-length batches (every position takes loss, as packed raw
text does). Used by the CPU accuracy test of the planner and by ``benchmarks/plan_validation.py``.

Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA, and on CPU the growth of the process's
peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` before the model is loaded).
Run one measurement per process: what an earlier one left in the allocator would count against the next.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

METHODS = ("lora", "qlora", "esft", "full")
ESFT_SHARE = 0.2
"""Share of each MoE layer's experts an ESFT measurement trains (ESFT-Token's p = 0.2 picks about this many)."""


@dataclass(frozen=True)
class Measurement:
    base: str
    method: str
    seq: int
    batch: int
    steps: int
    device: str
    peak_bytes: int
    """CUDA: max_memory_allocated; CPU: peak RSS growth since before the model was loaded."""
    weights_bytes: int
    trainable_params: int
    seconds_per_step: float
    tokens_per_s: float
    layers: int | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_rss_peak() -> None:
    # Writing 5 resets VmHWM to the current RSS (Linux >= 4.0, proc(5)).
    Path("/proc/self/clear_refs").write_text("5")


def finance_terms() -> list[str]:
    from dsft.domains import resolve_domain

    return [t for t, _ in resolve_domain("finance").terms]


def setup(loaded, method: str, r: int = 16, alpha: int = 32, terms: list[str] | None = None, compile_layers: bool = False):
    """Make ``loaded.model`` trainable as ``dsft train`` would for ``method``.

    Returns:
        (model to train, optimizer, expert-parameter entries for ESFT's gradient mask or []).
    """
    import torch

    from dsft.adapters.esft import expert_parameters, moe_layers
    from dsft.adapters.lora import LoraSettings, attach_lora
    from dsft.adapters.terms import extend_model, plan_terms
    from dsft.base.arch import num_experts

    model, tokenizer, spec = loaded.model, loaded.tokenizer, loaded.spec
    cuda = model.device.type == "cuda"
    if cuda:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method in ("lora", "qlora", "esft"):
        extend_model(model, tokenizer, plan_terms(tokenizer, terms if terms is not None else finance_terms()))
    experts: list = []
    if method in ("lora", "qlora"):
        model = attach_lora(model, spec, LoraSettings(r=r, alpha=alpha))
    for p in model.parameters():
        p.requires_grad_(method == "full")
    main: list = []
    if method in ("lora", "qlora"):
        main = [p for n, p in model.named_parameters() if "lora_" in n]
    elif method == "esft":
        n_exp = num_experts(spec, model.config)
        k = max(1, math.ceil(ESFT_SHARE * n_exp))
        selection = {i: tuple(range(k)) for i in moe_layers(model, spec)}
        experts = expert_parameters(model, spec, selection)
        main = [p for _, p, _, _ in experts]
    rows = [p for n, p in model.named_parameters() if n.endswith(".rows")]
    for p in main + rows:
        p.requires_grad_(True)
    if cuda and hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    if cuda and compile_layers:
        from dsft.kernels.compile import compile_decoder_layers

        compile_decoder_layers(model)
    if method == "full":
        groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": 0.0}]
    else:
        groups = [g for g in ({"params": main, "weight_decay": 0.0}, {"params": rows, "weight_decay": 0.0}) if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.99))
    return model, optimizer, experts


def measure(base: str, method: str, seq: int, batch: int, steps: int = 3, device: str | None = None,
            compile_layers: bool = False, loaded=None) -> Measurement:
    """Peak memory of ``steps`` training steps of ``method`` at ``batch`` x ``seq`` tokens on ``base``.

    Args:
        loaded: an already loaded base (:func:`dsft.base.load_base`) to use instead of loading ``base``;
            on CPU the RSS baseline is then taken after loading, so the weights are not in the growth.

    Raises:
        UsageError: unknown method; qlora without bitsandbytes.
    """
    import torch

    from dsft.adapters.esft import expert_grad_mask
    from dsft.base import load_base
    from dsft.base.arch import num_experts
    from dsft.base.router import RouterProbe
    from dsft.errors import UsageError
    from dsft.recipes.loop import train_steps

    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_rss_peak()
    rss0 = 0 if cuda else _rss_bytes("VmRSS")
    if loaded is None:
        if method == "qlora":
            loaded = load_quantized(base, device)
        else:
            loaded = load_base(base, device=device)
    weights = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    model, optimizer, experts = setup(loaded, method, compile_layers=compile_layers)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    vocab = len(loaded.tokenizer)
    g = torch.Generator().manual_seed(0)

    def batches(step: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids)}

    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    probe = RouterProbe(base_model, loaded.spec)
    mask = expert_grad_mask(experts, num_experts(loaded.spec, base_model.config)) if experts else nullcontext()
    t0 = time.perf_counter()
    try:
        with mask:
            train_steps(model, optimizer, batches, steps=steps, peak_lrs=[1e-4] * len(optimizer.param_groups), warmup=0,
                        schedule="constant", grad_clip=1.0, probe=probe)
        if cuda:
            torch.cuda.synchronize()
    finally:
        probe.close()
    seconds = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM") - rss0
    return Measurement(base, method, seq, batch, steps, device, int(peak), int(weights), int(trainable), round(seconds, 4),
                       round(batch * seq / seconds, 1), base_model.config.num_hidden_layers)


def load_quantized(base: str, device: str):
    """The base with its linear layers in 4-bit NF4 (bitsandbytes), as QLoRA trains it.

    Raises:
        UsageError: bitsandbytes is not installed or there is no CUDA device.
    """
    import torch

    from dsft.base.loading import LoadedBase, read_config, resolve_base
    from dsft.base.arch import spec_for
    from dsft.base.fingerprint import load_fingerprint
    from dsft.errors import UsageError

    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError("qlora needs bitsandbytes (pip install 'dsft[gpu]')") from None
    if not device.startswith("cuda"):
        raise UsageError("qlora needs a CUDA device")
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    ref = resolve_base(base)
    config = read_config(ref)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["lm_head", "gate"])
    model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=torch.bfloat16, device_map=device, quantization_config=quant)
    tokenizer = AutoTokenizer.from_pretrained(ref.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedBase(ref, model, tokenizer, spec_for(config.get("model_type"), config.get("architectures")), load_fingerprint(ref.path))
