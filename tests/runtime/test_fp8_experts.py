"""A runtime whose routed experts are held in FP8 (``load_base(fp8_experts=True)``): half their bytes, mixed
batches still give each row what its adapter alone gives, outputs within FP8's rounding of the full-width base,
and ``close()`` gives the model back in its own dtype."""
from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import dsft
from dsft.cli.main import app
from dsft.runtime.fp8_experts import scales_of


def test_fp8_experts_serve_mixed_batches_like_each_adapter_alone(refs, texts):
    fp8 = dsft.load_base("tiny-deepseek-v2", device="cpu", fp8_experts=True)
    full = dsft.load_base("tiny-deepseek-v2", device="cpu")
    for runtime in (fp8, full):
        runtime.attach(refs["finance"])
        runtime.attach(refs["legal"])
    rows = ["finance", "legal", None, "finance"]
    prompts = texts[: len(rows)]
    modules = fp8._lora.experts_modules()  # in FP8 from the load on (a server sizes its KV cache after it)
    assert modules and all(m.gate_up_proj.dtype == torch.float8_e4m3fn and m.down_proj.dtype == torch.float8_e4m3fn
                           and scales_of(m)[0] is not None for m in modules)
    mixed = fp8.logits(prompts, adapters=rows)
    wide = full.logits(prompts, adapters=rows)
    for prompt, adapter, got, want in zip(prompts, rows, mixed, wide):
        torch.testing.assert_close(got, fp8.logits([prompt], adapters=[adapter])[0], rtol=0, atol=1e-5)
        assert 0 < (got - want).abs().max() < 0.05 * want.abs().max()  # FP8's rounding of the experts, no more
    gen = fp8.generate(prompts, adapters=rows, max_new_tokens=8, ignore_eos=True)
    for prompt, adapter, out in zip(prompts, rows, gen):
        assert out.token_ids == fp8.generate(prompt, adapter=adapter, max_new_tokens=8, ignore_eos=True).token_ids

    fp8.close()
    assert all(m.gate_up_proj.dtype == torch.float32 and scales_of(m) == (None, None) for m in modules)
    ids = fp8.tokenizer(texts[0], return_tensors="pt").input_ids
    with torch.no_grad():  # the plain model runs again, on the weights FP8 rounded
        plain = fp8.model(input_ids=ids).logits[0]
    assert 0 < (plain - full.logits([texts[0]])[0]).abs().max() < 0.05 * plain.abs().max()


def test_dsft_generate_fp8_experts_answers_what_the_python_api_gives(refs):
    prompt = "What is a collateralized debt obligation?"
    want = dsft.load_base("tiny-deepseek-v2", device="cpu", fp8_experts=True, adapters=[refs["finance"]]).generate(
        prompt, adapter=refs["finance"], max_new_tokens=6)
    out = CliRunner().invoke(app, ["generate", "--fp8-experts", "--adapter", refs["finance"], prompt, "-n", "6", "--json",
                                   "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["text"] == want.text


def test_fp8_experts_on_a_base_without_fused_experts_is_one_clear_error_before_any_change(monkeypatch):
    from dsft.base import load_base as load_plain
    from dsft.errors import UsageError
    from dsft.runtime import base as runtime_base

    loaded = load_plain("tiny-deepseek-v2", device="cpu")
    embed = loaded.model.get_input_embeddings()
    monkeypatch.setattr(runtime_base, "supports_fused_experts", lambda module: False)
    with pytest.raises(UsageError, match="--fp8-experts: tiny-deepseek-v2 has no routed experts"):
        runtime_base.RuntimeBase(loaded, fp8_experts=True)
    assert loaded.model.get_input_embeddings() is embed  # the model was left as it was
