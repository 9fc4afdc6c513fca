"""The compatibility rules as pure functions: fingerprints and manifests in, status and reasons out."""
from __future__ import annotations

from registry_helpers import EMBED, EXPERTS, Q_PROJ, fingerprint, manifest

from dsft.registry.compat import applies_to, decide, incompatibilities


def test_same_base_is_compatible_or_verified() -> None:
    fp = fingerprint()
    m = manifest("finance", "0.1.0", fp)
    assert incompatibilities(m, fp) == []
    d = decide(m, fp)
    assert d.status == "compatible" and d.ok
    assert "same weights" in d.reasons[0]
    assert decide(m, fp, verified=True).status == "verified"


def test_same_weights_different_name_is_compatible() -> None:
    fp = fingerprint()
    m = manifest("finance", "0.1.0", fp)
    m["base"]["name"] = "some-other-name"
    assert decide(m, fingerprint()).status == "compatible"


def test_different_weights_same_shapes_is_compatible_until_evaluated() -> None:
    m = manifest("finance", "0.1.0", fingerprint())
    d = decide(m, fingerprint(weights="w2"))
    assert d.status == "compatible"
    assert "not evaluated" in d.reasons[0] and "dsft eval" in d.reasons[0]
    assert decide(m, fingerprint(weights="w2"), verified=True).status == "verified"


def test_architecture_differs() -> None:
    m = manifest("finance", "0.1.0", fingerprint())
    d = decide(m, fingerprint(arch="Qwen3MoeForCausalLM"))
    assert d.status == "incompatible"
    assert d.reasons == ("architecture differs: adapter trained on DeepseekV2ForCausalLM, base is Qwen3MoeForCausalLM",)


def test_every_module_shape_is_named_with_both_shapes() -> None:
    m = manifest("finance", "0.1.0", fingerprint(),
                 targets={Q_PROJ: [64, 64], EXPERTS: [8, 256, 64], "model.layers.9.mlp.gate.weight": [8, 64]})
    reasons = incompatibilities(m, fingerprint(hidden=128, experts=16))
    assert reasons == [
        "module model.layers.0.self_attn.q_proj.weight: adapter expects shape [64, 64], base has [128, 128]",
        "module model.layers.1.mlp.experts.gate_up_proj: adapter expects shape [8, 256, 64], base has [16, 512, 128]",
        "module model.layers.9.mlp.gate.weight: adapter expects shape [8, 64], base has no such parameter",
    ]


def test_term_extension_needs_the_same_tokenizer() -> None:
    m = manifest("finance", "0.1.0", fingerprint())
    d = decide(m, fingerprint(tokenizer="t2"))
    assert d.status == "incompatible"
    assert len(d.reasons) == 1
    assert d.reasons[0].startswith("tokenizer changed") and "term extension" in d.reasons[0]
    # a plain LoRA adds no tokens: a new tokenizer with the same vocabulary size still loads
    plain = manifest("finance", "0.1.0", fingerprint(), kind="lora", added_tokens=[])
    d = decide(plain, fingerprint(tokenizer="t2"))
    assert d.status == "compatible" and any("tokenizer differs" in r for r in d.reasons)


def test_vocab_size_differs() -> None:
    m = manifest("finance", "0.1.0", fingerprint(), targets={})
    d = decide(m, fingerprint(vocab=5000))
    assert d.reasons == ("vocabulary size differs: adapter extends a 4096-token vocabulary, base has 5000 tokens",)


def test_all_reasons_are_collected_in_order() -> None:
    m = manifest("finance", "0.1.0", fingerprint(), targets={Q_PROJ: [64, 64], EMBED: [4096, 64]})
    reasons = incompatibilities(m, fingerprint(arch="Other", tokenizer="t2", vocab=8192, hidden=32))
    assert [r.split(" ")[0] for r in reasons] == ["architecture", "vocabulary", "tokenizer", "module", "module"]


def test_imported_adapter_without_recorded_base_is_judged_on_shapes() -> None:
    m = manifest("finance", "0.1.0", fingerprint(), added_tokens=[], vocab=None)
    m["base"] = None
    assert decide(m, fingerprint(arch="Anything")).status == "compatible"
    assert decide(m, fingerprint(hidden=32)).status == "incompatible"
    assert applies_to(m, "Anything") and not applies_to(manifest("x", None, fingerprint()), "Other")


def test_base_fingerprint_without_shapes_cannot_be_checked() -> None:
    fp = fingerprint()
    del fp["param_shapes"]
    d = decide(manifest("finance", "0.1.0", fingerprint()), fp)
    assert d.status == "incompatible" and "no param_shapes" in d.reasons[0]
