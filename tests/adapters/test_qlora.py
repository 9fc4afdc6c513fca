"""QLoRA: the frozen base in NF4, LoRA training exactly as on a base holding the dequantised weights."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from typer.testing import CliRunner

from dsft.adapters.lora import LoraSettings, attach_lora
from dsft.adapters.qlora import SUFFIX, expert_weights, quantize_base
from dsft.cli.main import app
from dsft.kernels.nf4 import Nf4Linear, Nf4Tensor

GROUPS = ("attention", "shared_experts", "routed_experts")


def _lora_model(seed=0):
    from dsft.base import load_base

    loaded = load_base("tiny-deepseek-v2", device="cpu")
    torch.manual_seed(seed)
    model = attach_lora(loaded.model, loaded.spec, LoraSettings(r=4, alpha=8, targets=GROUPS))
    with torch.no_grad():  # LoRA B starts at zero; move it so that every factor gets a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    return model, loaded.spec


def _loss_and_grads(model, ids):
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_on_an_nf4_base_trains_as_on_the_dequantised_weights(home):
    ids = torch.randint(0, 4000, (2, 24), generator=torch.Generator().manual_seed(0))
    q_model, spec = _lora_model()
    report = quantize_base(q_model, spec)
    assert report.linears > 0 and report.expert_tensors == 6  # 3 MoE layers x (gate_up_proj, down_proj)
    assert report.bytes_after < 0.16 * report.bytes_before  # fp32 -> 4.5 bits a value

    # The reference: the same LoRA model, unquantised, with each quantised weight replaced by its dequantised values.
    ref, _ = _lora_model()
    q_modules = dict(q_model.named_modules())
    with torch.no_grad():
        for name, module in ref.named_modules():
            q = q_modules.get(name)
            if isinstance(q, Nf4Linear):
                module.weight.copy_(q.nf4())
            elif isinstance(q_modules.get(f"{name}.gate_up_proj{SUFFIX}"), Nf4Tensor):  # a fused experts module
                gu, dn = expert_weights(q)
                module.gate_up_proj.copy_(gu)
                module.down_proj.copy_(dn)
    loss_q, grads_q = _loss_and_grads(q_model, ids)
    loss_r, grads_r = _loss_and_grads(ref, ids)
    assert set(grads_q) == set(grads_r) and any("mlp.experts" in n for n in grads_q)
    torch.testing.assert_close(loss_q, loss_r, rtol=1e-6, atol=1e-6)
    for n, g in grads_r.items():
        torch.testing.assert_close(grads_q[n], g, rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")

    # Routers, norms, embeddings and head are not quantised; LoRA factors are untouched parameters.
    names = {n for n, _ in q_model.named_parameters()}
    assert any(n.endswith("mlp.gate.weight") for n in names) and any("lora_A" in n for n in names)
    assert not any(isinstance(m, Nf4Linear) for n, m in q_model.named_modules() if "lora_" in n)


def test_train_qlora_from_the_cli_saves_a_lora_adapter_for_the_plain_base(home):
    result = CliRunner().invoke(app, ["train", "--domain", "finance", "--qlora", "--max-steps", "4", "--json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["metrics"]["eval_loss_after"] < out["metrics"]["eval_loss_before"]
    adapter = Path(out["path"])
    assert "quantize: nf4" in (adapter / "recipe.yaml").read_text()
    assert (adapter / "adapter_model.safetensors").exists()

    import dsft

    served = dsft.load_base("tiny-deepseek-v2", device="cpu")  # the adapter goes onto the ordinary base
    served.attach(out["adapter"])
    assert served.logits(["The bond desk priced the new issue."], adapters=["finance"])[0].isfinite().all()


def test_qlora_with_an_esft_recipe_is_refused_in_one_line(home):
    result = CliRunner().invoke(app, ["train", "--recipe", "esft", "--qlora", "--max-steps", "2"])
    assert result.exit_code != 0
    assert "quantize" in result.stderr and "esft" in result.stderr and "Traceback" not in result.stderr
