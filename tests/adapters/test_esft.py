"""ESFT expert selection: the smallest set of experts whose normalised scores reach p, per layer."""
from __future__ import annotations

import json

from typer.testing import CliRunner

from dsft.adapters.esft import select_experts
from dsft.cli.main import app


def test_selection_takes_the_highest_scores_until_p_is_reached():
    scores = [0.05, 0.40, 0.10, 0.30, 0.15]
    assert select_experts(scores, 0.2) == [1]
    assert select_experts(scores, 0.5) == [1, 3]
    assert select_experts(scores, 0.71) == [1, 3, 4]
    assert select_experts([2.0, 2.0], 1.0) == [0, 1]  # unnormalised counts work the same
    assert select_experts([0, 0, 0], 0.2) == []


def test_experts_score_cli_writes_a_per_layer_selection(home, tmp_path):
    out = tmp_path / "sel.json"
    for method, p in (("token", 0.2), ("gate", 0.1)):
        result = CliRunner().invoke(app, ["experts", "score", "--domain", "finance", "--method", method,
                                          "--sample-tokens", "4096", "--out", str(out), "--json"])
        assert result.exit_code == 0, result.stderr
        sel = json.loads(out.read_text())
        assert sel["method"] == method and sel["p"] == p
        assert set(sel["layers"]) == {"1", "2", "3"}  # the MoE layers of tiny-deepseek-v2
        for layer in sel["layers"].values():
            assert abs(sum(layer["scores"]) - 1) < 1e-4 and layer["selected"]
            top = max(range(len(layer["scores"])), key=layer["scores"].__getitem__)
            assert top in layer["selected"]
        assert 0 < sel["selected_share"] < 1
    bad = CliRunner().invoke(app, ["experts", "score", "--p", "1.5"])
    assert bad.exit_code == 2 and "--p must be in (0, 1]" in bad.stderr


# --- training only the selected experts, saving and loading their slices -----------------------------

import pytest
import torch

from dsft.adapter_format import Manifest
from dsft.adapters.esft import (
    ESFT_FILE,
    expert_grad_mask,
    expert_parameters,
    load_esft,
    put_slices,
    save_esft,
    select_layers,
    select_slices,
)

SELECTION = {1: (2,), 2: (0, 5), 3: (7,)}
NO_TERMS = Manifest(schema_version=1, domain="finance", version="0.1.0", kind="esft", base=None, target_shapes={},
                    added_tokens=(), files={})


def test_select_layers_applies_p_per_layer():
    scores = {1: [0.5, 0.3, 0.2], 3: [1.0, 1.0, 2.0]}
    assert select_layers(scores, 0.5) == {1: (0,), 3: (2,)}
    assert select_layers(scores, 0.7) == {1: (0, 1), 3: (0, 2)}  # 0.5 + 0.25: ties go to the lower index


def test_slices_of_both_peft_layouts_round_trip():
    E, r = 4, 2
    idx = torch.tensor([1, 3])
    W = torch.randn(E, 6, 5)  # fused weight: experts on dim 0
    assert torch.equal(select_slices(W, E, idx, 0), W[idx])
    A = torch.randn(E * r, 5)  # PEFT lora_A of a 3-D parameter: expert-major rows
    assert torch.equal(select_slices(A, E, idx, 0), A.view(E, r, 5)[idx].reshape(-1, 5))
    B = torch.randn(6, r * E)  # PEFT lora_B: expert-minor columns
    assert torch.equal(select_slices(B, E, idx, -1), B.view(6, r, E)[..., idx].reshape(6, -1))
    for t, dim in ((W, 0), (A, 0), (B, -1)):
        z = torch.zeros_like(t)
        put_slices(z, E, idx, dim, select_slices(t, E, idx, dim))
        assert torch.equal(select_slices(z, E, idx, dim), select_slices(t, E, idx, dim))
        assert z.count_nonzero() == select_slices(t, E, idx, dim).count_nonzero()


@pytest.fixture
def tiny(home):
    from dsft.base import load_base

    return load_base("tiny-deepseek-v2", device="cpu")


def test_masked_gradients_leave_the_other_experts_bit_identical(tiny):
    from dsft.adapters.esft import score_experts
    from dsft.data.tokenize import Examples

    model, spec = tiny.model, tiny.spec
    ids = torch.randint(0, 4000, (4, 32), generator=torch.Generator().manual_seed(0))
    scores = score_experts(model, spec, Examples(ids, ids, torch.ones_like(ids)))
    selection = select_layers(scores.of("token"), 0.3)  # experts these tokens use, so their gradients are not zero anyway
    assert all(0 < len(v) < 8 for v in selection.values())
    params = expert_parameters(model, spec, selection)
    before = {name: p.detach().clone() for name, p, _, _ in params}
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p, _, _ in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([p for _, p, _, _ in params], lr=1e-2, weight_decay=0.0)
    model.train()
    with expert_grad_mask(params, 8):
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    for name, p, idx, _ in params:
        others = [e for e in range(8) if e not in idx.tolist()]
        assert torch.equal(p.detach()[others], before[name][others]), name
        assert not torch.equal(p.detach()[idx], before[name][idx]), f"{name}: the selected experts should train"


def test_saved_slices_put_onto_a_fresh_base_give_the_same_logits(tiny, tmp_path):
    from safetensors.torch import load_file

    from dsft.base import load_base

    model, spec = tiny.model, tiny.spec
    with torch.no_grad():  # stand-in for training: move only the selected experts
        for _, p, idx, _ in expert_parameters(model, spec, SELECTION):
            p[idx] += 0.05 * torch.randn_like(p[idx])
    shapes = save_esft(tmp_path / ESFT_FILE, model, spec, SELECTION)
    assert shapes["model.layers.2.mlp.experts.gate_up_proj"] == list(model.model.layers[2].mlp.experts.gate_up_proj.shape)
    saved = load_file(str(tmp_path / ESFT_FILE))
    assert saved["model.layers.2.mlp.experts.down_proj"].shape[0] == 2  # only the two selected experts' slices
    assert saved["model.layers.2.mlp.experts.down_proj.experts"].tolist() == [0, 5]

    fresh = load_base("tiny-deepseek-v2", device="cpu")
    ids = torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = fresh.model(input_ids=ids).logits
        loaded = load_esft(fresh.model, fresh.tokenizer, tmp_path, NO_TERMS)
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
        assert not torch.allclose(base_logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("lora", [False, True], ids=["full-weights", "lora-on-experts"])
def test_esft_recipe_trains_a_few_experts_and_reloads_to_the_trained_loss(home, lora):
    from safetensors.torch import load_file

    import dsft
    from dsft.adapter_format import read_manifest
    from dsft.adapters.store import load_adapter
    from dsft.base import load_base
    from dsft.domains import general_pack, resolve_domain
    from dsft.eval.heldout import eval_sets
    from dsft.recipes.stages import evaluate

    result = dsft.train(recipe="esft", max_steps=4, checkpoint_every=0,
                        overrides=["stages.0.esft.sample_tokens=4096", "stages.0.batch_size=4", f"stages.0.esft.lora={str(lora).lower()}"])
    m = result.metrics
    assert m["eval_loss_after"] < m["eval_loss_before"]
    assert m["esft"]["selected_share"] < 0.25 and m["esft"]["lora"] is lora
    manifest = read_manifest(result.path)
    assert manifest.kind == "esft+terms" and manifest.esft["selection"] == m["esft"]["selection"]
    assert {"esft.safetensors", "terms.safetensors"} <= set(manifest.files) and "adapter_model.safetensors" not in manifest.files
    saved = load_file(str(result.path / ESFT_FILE))
    n_selected = sum(len(v) for v in m["esft"]["selection"].values())
    assert sum(v.shape[0] for k, v in saved.items() if k.endswith("gate_up_proj")) == n_selected

    # The adapter put back onto a fresh base scores exactly what the trained model scored in memory.
    loaded = load_base("tiny-deepseek-v2", device="cpu")
    pack = resolve_domain("finance")
    _, base_tokens = eval_sets(pack, general_pack(), loaded.tokenizer, 128)
    model = load_adapter(loaded.model, loaded.tokenizer, result.path)
    sets, _ = eval_sets(pack, general_pack(), loaded.tokenizer, 128)
    again = evaluate(model, {"domain": sets["domain"]}, base_tokens)
    assert again["domain_loss"] == pytest.approx(m["eval_loss_after"], abs=2e-5)

    # The runtime serves it too (its experts for its rows), giving the same logits as the in-place load.
    served = dsft.load_base("tiny-deepseek-v2", device="cpu")
    served.attach(result.adapter)
    text = "The collateralized debt obligation desk reviewed its duration risk."
    ids = served.tokenizer_for("finance")(text, return_tensors="pt").input_ids
    with torch.no_grad():
        want = model(input_ids=ids).logits[0]
    torch.testing.assert_close(served.logits([text], adapters=["finance"])[0], want, rtol=0, atol=1e-5)
