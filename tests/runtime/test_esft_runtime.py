"""ESFT adapters on the runtime: their own experts for their own rows, beside LoRA adapters and the plain base."""
from __future__ import annotations

import pytest
import torch

import dsft

ATOL = 1e-5


@pytest.fixture(scope="module")
def esft_ref(rt_home, refs) -> str:
    from dsft.base import load_base
    from dsft.testing.adapters import make_esft_adapter

    return make_esft_adapter(load_base("tiny-deepseek-v2", device="cpu"), "esftdemo", seed=3).ref


@pytest.fixture(scope="module")
def served(esft_ref, refs):
    base = dsft.load_base("tiny-deepseek-v2", device="cpu")
    base.attach(esft_ref)
    base.attach(refs["legal"])
    return base


def test_an_esft_adapter_alone_gives_the_logits_of_the_base_with_its_experts_swapped_in(served, esft_ref, texts):
    from dsft.adapters.store import load_adapter
    from dsft.base import load_base

    rec = dsft.open_registry().resolve(esft_ref)
    plain = load_base("tiny-deepseek-v2", device="cpu")
    ids = plain.tokenizer(texts[0], return_tensors="pt").input_ids
    with torch.no_grad():
        before = plain.model(input_ids=ids).logits[0]
        want = load_adapter(plain.model, plain.tokenizer, rec.path)(input_ids=ids).logits[0]
    assert not torch.allclose(before, want, atol=1e-3), "the swapped experts should change the logits"
    got = served.logits([texts[0]], adapters=["esftdemo"])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_a_batch_mixing_esft_lora_and_base_rows_gives_each_row_its_own_result(served, esft_ref, refs, alone, texts):
    solo = dsft.load_base("tiny-deepseek-v2", device="cpu")
    solo.attach(esft_ref)
    rows = ["esftdemo", "legal", None, "esftdemo"]
    mixed = served.logits(texts, adapters=rows)
    for prompt, adapter, got in zip(texts, rows, mixed):
        ref = solo if adapter == "esftdemo" else alone[adapter]
        torch.testing.assert_close(got, ref.logits([prompt], adapters=[adapter])[0], rtol=0, atol=ATOL)
    gen = served.generate(texts, adapters=rows, max_new_tokens=6, ignore_eos=True)
    assert gen[0].token_ids == solo.generate(texts[0], adapter="esftdemo", max_new_tokens=6, ignore_eos=True).token_ids


def test_detaching_an_esft_adapter_leaves_the_base_experts_untouched(esft_ref, alone, texts):
    base = dsft.load_base("tiny-deepseek-v2", device="cpu")
    base.attach(esft_ref)
    base.detach("esftdemo")
    torch.testing.assert_close(base.logits([texts[1]])[0], alone[None].logits([texts[1]])[0], rtol=0, atol=0)


def test_an_esft_adapter_exports_merged_and_refuses_the_peft_format(esft_ref, served, texts, tmp_path):
    from transformers import AutoModelForCausalLM

    from dsft.errors import UsageError
    from dsft.runtime.export import export_adapter

    with pytest.raises(UsageError, match="--format merged"):
        export_adapter(esft_ref, tmp_path / "peft", format="peft")
    assert not (tmp_path / "peft").exists()
    export_adapter(esft_ref, tmp_path / "merged", format="merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = served.tokenizer(texts[2], return_tensors="pt").input_ids
    with torch.no_grad():
        got = model(input_ids=ids).logits[0]
    torch.testing.assert_close(got, served.logits([texts[2]], adapters=["esftdemo"])[0], rtol=0, atol=ATOL)
