"""One loaded base, several domain adapters: attach, mix per row, swap, detach, refuse."""
from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

import dsft
from dsft.errors import IncompatibleError, IntegrityError, NotFoundError, UsageError
from tests.runtime.conftest import in_background

ATOL = 1e-5
TIMEOUT = 120


def test_load_base_is_a_runtime_that_keeps_the_loaded_base_fields(refs):
    base = dsft.load_base("tiny-deepseek-v2", device="cpu")
    assert type(base).__name__ == "RuntimeBase"
    assert base.model is not None and base.tokenizer is not None and base.spec.model_type == "deepseek_v2"
    assert base.fingerprint["architecture"] == "DeepseekV2ForCausalLM" and base.ref.name == "tiny-deepseek-v2"
    assert base.adapters == {}


def test_each_adapter_has_its_own_term_range_and_tokenizer(attached, refs):
    infos = attached.adapters
    assert set(infos) == {refs[d] for d in ("finance", "legal", "medical")}
    ranges = sorted((i.term_range for i in infos.values()), key=lambda r: r.start)
    first = max(attached.model.get_input_embeddings().base.num_embeddings, len(attached.tokenizer))
    assert ranges[0].start >= first
    assert all(a.end <= b.start for a, b in zip(ranges, ranges[1:])), ranges
    # A request routed to an adapter is tokenised with that adapter's terms (its own local ids).
    fin, legal = attached.tokenizer_for("finance"), attached.tokenizer_for("legal")
    term = "collateralized debt obligation"
    fin_ids = fin(f"A {term} desk", add_special_tokens=False)["input_ids"]
    r = infos[refs["finance"]].term_range
    # in running text the term is its in-sentence form " term" (one token, as BPE words carry their space)
    term_id = fin.convert_tokens_to_ids(" " + term)
    assert term_id in fin_ids and r.local_start <= term_id < r.local_end
    assert not any(i >= len(attached.tokenizer) for i in legal(f"A {term} desk", add_special_tokens=False)["input_ids"])


def test_a_single_adapter_gives_the_logits_of_plain_peft(attached, refs, texts):
    from dsft.adapters.store import load_adapter
    from dsft.base import load_base

    ref = dsft.open_registry().resolve(refs["finance"])
    plain = load_base("tiny-deepseek-v2", device="cpu")
    peft_model = load_adapter(plain.model, plain.tokenizer, ref.path)
    ids = plain.tokenizer(texts[0], return_tensors="pt").input_ids
    assert (ids >= ref.manifest["term_start"]).any(), "the text should use a term token"
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits[0]
    got = attached.logits([texts[0]], adapters=["finance"])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_a_mixed_batch_gives_each_row_what_its_adapter_alone_gives(attached, alone, texts):
    rows = ["finance", "legal", "medical", None, "legal", "finance"]
    prompts = texts + texts[:2]
    mixed_logits = attached.logits(prompts, adapters=rows)
    mixed = attached.generate(prompts, adapters=rows, max_new_tokens=12, ignore_eos=True)
    for prompt, adapter, logits, gen in zip(prompts, rows, mixed_logits, mixed):
        ref = alone[adapter]
        torch.testing.assert_close(logits, ref.logits([prompt], adapters=[adapter])[0], rtol=0, atol=ATOL)
        single = ref.generate(prompt, adapter=adapter, max_new_tokens=12, ignore_eos=True)
        assert gen.token_ids == single.token_ids, (adapter, prompt)
        assert gen.text == single.text
    # The adapters really differ: the same prompt continues differently under each.
    outs = attached.generate([texts[3]] * 4, adapters=["finance", "legal", "medical", None], max_new_tokens=8, ignore_eos=True)
    assert len({tuple(o.token_ids) for o in outs}) == 4


def test_none_rows_are_the_plain_base(attached, texts):
    from dsft.base import load_base

    plain = load_base("tiny-deepseek-v2", device="cpu")
    ids = plain.tokenizer(texts[3], return_tensors="pt").input_ids
    with torch.no_grad():
        want = plain.model(input_ids=ids).logits[0]
    got = attached.logits([texts[3], texts[0]], adapters=[None, "finance"])[0]
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_stream_yields_the_generated_text_piece_by_piece(attached, texts):
    pieces = list(attached.stream(texts[1], adapter="legal", max_new_tokens=16, ignore_eos=True))
    assert len(pieces) > 1
    assert "".join(pieces) == attached.generate(texts[1], adapter="legal", max_new_tokens=16, ignore_eos=True).text


def test_seeded_sampling_is_reproducible_and_stop_strings_cut(attached, texts):
    a = attached.generate(texts[2], adapter="medical", max_new_tokens=16, temperature=0.9, seed=3, ignore_eos=True)
    b = attached.generate(texts[2], adapter="medical", max_new_tokens=16, temperature=0.9, seed=3, ignore_eos=True)
    assert a.token_ids == b.token_ids
    full = attached.generate(texts[3], max_new_tokens=16, ignore_eos=True).text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = attached.generate(texts[3], max_new_tokens=16, ignore_eos=True, stop=[stop])
    assert cut.finish_reason == "stop" and cut.text == full[: full.index(stop)]


def test_unknown_adapters_are_refused_with_what_is_attached(attached, texts):
    with pytest.raises(NotFoundError, match="finance@0.1.0"):
        attached.generate(texts[0], adapter="astrology")
    with pytest.raises(NotFoundError):
        attached.generate(texts[0], adapter="finance@9.9.9")


def test_an_attach_goes_in_between_two_tokens_of_a_long_generate_and_leaves_its_tokens_unchanged(attached, alone, refs, texts):
    """generate() holds the runtime's lock a step at a time, as the engine does: an attach from another
    thread does not wait for the whole generation."""
    ask = dict(adapter="legal", raw=True, max_new_tokens=300, ignore_eos=True)
    started = threading.Event()
    answer, thread = in_background(attached.generate, texts[1], on_text=lambda *_: started.set(), **ask)
    try:
        assert started.wait(TIMEOUT)
        attached.attach(refs["finance2"])
        assert not answer.done(), "the attach waited for the whole generation"
        got = answer.result(TIMEOUT)
    finally:
        thread.join(TIMEOUT)
        if refs["finance2"] in attached.adapters:
            attached.detach(refs["finance2"])
    assert len(got.token_ids) == 300 and got.token_ids == alone["legal"].generate(texts[1], **ask).token_ids


def test_a_row_whose_adapter_is_detached_while_run_generates_it_fails_alone(attached, alone, refs, texts):
    attached.attach(refs["finance2"])
    started = threading.Event()
    try:
        doomed = attached.make_row(attached.encode(texts[0], refs["finance2"], raw=True), attached.resolve(refs["finance2"]),
                                   max_new_tokens=300, ignore_eos=True, on_text=lambda _: started.set())
        other = attached.make_row(attached.encode(texts[1], "legal", raw=True), attached.resolve("legal"),
                                  max_new_tokens=40, ignore_eos=True)
        thread = threading.Thread(target=attached.run, args=([doomed, other],), daemon=True)
        thread.start()
        assert started.wait(TIMEOUT)
        attached.detach(refs["finance2"])  # between two steps, as with the engine
        thread.join(TIMEOUT)
    finally:
        if refs["finance2"] in attached.adapters:
            attached.detach(refs["finance2"])
    assert doomed.finish_reason == "error" and "detached while this request was generating" in str(doomed.error)
    assert len(doomed.tokens) < 300
    assert other.tokens == alone["legal"].generate(texts[1], adapter="legal", raw=True, max_new_tokens=40,
                                                   ignore_eos=True).token_ids


def _weights(base, ref):
    att = base._attached[ref]
    return [weakref.ref(t) for t in att.weights.tensors()]


def test_detach_frees_the_adapter_and_its_memory(refs, texts):
    base = dsft.load_base("tiny-deepseek-v2", device="cpu")
    base.attach(refs["finance"])
    base.attach(refs["legal"])
    assert base.memory()[refs["legal"]] > 0
    legal = _weights(base, refs["legal"])
    assert base.detach("legal").ref == refs["legal"]
    gc.collect()
    assert all(r() is None for r in legal), "detached tensors are still referenced"
    assert set(base.memory()) == {refs["finance"]} and set(base.adapters) == {refs["finance"]}
    with pytest.raises(NotFoundError):
        base.generate(texts[1], adapter="legal")
    base.close()
    assert base.model.get_input_embeddings().__class__.__name__ == "Embedding"


def test_a_second_version_is_attached_beside_the_first_and_a_bare_domain_follows_production(refs, alone, texts):
    base = dsft.load_base("tiny-deepseek-v2", device="cpu")
    first = base.attach("finance")  # no production tag: the newest version
    assert first.ref == refs["finance2"] and first.via == "newest version"
    assert base.attach(refs["finance"]).via is None
    assert set(base.adapters) == {refs["finance"], refs["finance2"]}

    def answer(adapter):
        return base.generate(texts[0], adapter=adapter, max_new_tokens=8, ignore_eos=True).token_ids

    old = alone["finance"].generate(texts[0], adapter="finance", max_new_tokens=8, ignore_eos=True).token_ids
    assert answer(refs["finance"]) == old and answer(refs["finance2"]) != old
    assert answer("finance") == answer(refs["finance2"])  # both attached, no tag: the newest
    with pytest.raises(UsageError, match="2 versions attached"):
        base.detach("finance")

    reg = dsft.open_registry()
    try:
        reg.tag(refs["finance"], "production")
        info = base.attach("finance")  # now the tagged version (attached already: nothing is loaded again)
        assert info.ref == refs["finance"] and info.via == "production tag"
        assert answer("finance") == old and answer("finance@production") == old
        assert base.resolve("finance@production").ref == refs["finance"]
    finally:
        reg.untag("finance", "production")
        reg.close()
    assert base.detach(refs["finance2"]).ref == refs["finance2"]
    assert answer("finance") == old
    base.close()


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_tampered_adapter_is_refused_naming_the_file(refs, rt_home, damage):
    from dsft.base import load_base as load_plain
    from dsft.testing.adapters import make_adapter

    rec = make_adapter(load_plain("tiny-deepseek-v2", device="cpu"), "tampered", seed=5, max_terms=4)
    weights = rec.path + "/adapter_model.safetensors"
    data = bytearray(open(weights, "rb").read())
    if damage == "truncated":  # fails to parse as well: the hash is what the error names
        data = data[: len(data) // 2]
    else:  # parses fine, to other numbers
        data[-10] ^= 0xFF
    open(weights, "wb").write(bytes(data))
    base = dsft.load_base("tiny-deepseek-v2", device="cpu")
    with pytest.raises(IntegrityError, match="adapter_model.safetensors"):
        base.attach(rec.ref)
    assert base.adapters == {}


def test_an_incompatible_adapter_is_refused_with_every_reason(refs):
    from dsft.base import load_base as load_plain
    from dsft.testing.adapters import make_adapter

    loaded = load_plain("tiny-deepseek-v2", device="cpu")
    other = dict(loaded.fingerprint, tokenizer_hash="0" * 64, id="1" * 64, vocab_size=5000)
    rec = make_adapter(loaded, "retokenized", seed=6, terms=["habeas corpus", "myocardial infarction"],
                       fingerprint=other, base_name="other-base")
    base = dsft.load_base("tiny-deepseek-v2", device="cpu")
    with pytest.raises(IncompatibleError) as err:
        base.attach(rec.ref)
    assert "tokenizer changed" in str(err.value) and "vocabulary size differs" in str(err.value)
    assert base.adapters == {}
