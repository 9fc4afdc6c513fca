"""Router probabilities, the load-balancing loss and ESFT's expert scores follow each architecture's router."""
from __future__ import annotations

import torch

from dsft.adapters.esft import score_experts
from dsft.base.arch import ARCHITECTURES
from dsft.base.router import RouterProbe, load_balancing_loss, router_probs
from dsft.data.tokenize import Examples


def test_sigmoid_router_probabilities_are_normalised_sigmoids():
    logits = torch.tensor([[0.0, 2.0, -1.0, 1.0]])
    p = router_probs(logits, "sigmoid")
    torch.testing.assert_close(p, logits.sigmoid() / logits.sigmoid().sum())
    torch.testing.assert_close(router_probs(logits), logits.softmax(-1))
    assert not torch.allclose(p, router_probs(logits))


def _router_outputs(model, ids):
    """Each MoE layer's (logits, top-k index) as the model's own routers return them."""
    seen = {}
    hooks = [layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (out[0], out[2])))
             for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    return seen


def test_deepseek_v3_load_balancing_and_expert_scores_use_its_sigmoid_router(tiny_deepseek_v3):
    model, spec = tiny_deepseek_v3, ARCHITECTURES["deepseek_v3"]
    ids = torch.randint(0, 400, (3, 12), generator=torch.Generator().manual_seed(0))
    routed = _router_outputs(model, ids)
    assert sorted(routed) == [1, 2]  # the first layer is dense

    probe = RouterProbe(model, spec)
    with torch.no_grad():
        model(input_ids=ids)
    want = sum(load_balancing_loss(logits, index, 8, "sigmoid") for logits, index in routed.values()) / len(routed)
    torch.testing.assert_close(probe.aux_loss(), want)

    scores = score_experts(model, spec, Examples(ids, ids, torch.ones_like(ids)), batch_size=2)
    for layer, (logits, index) in routed.items():
        per_seq = router_probs(logits, "sigmoid").view(3, 12, 8).mean(1)
        torch.testing.assert_close(torch.tensor(scores.gate[layer]), per_seq.mean(0), rtol=1e-5, atol=1e-6)
        chosen = torch.zeros(36, 8).scatter_(1, index, 1.0).view(3, 12, 8).mean(1).mean(0) / 2
        torch.testing.assert_close(torch.tensor(scores.token[layer]), chosen, rtol=1e-5, atol=1e-6)
        assert abs(sum(scores.gate[layer]) - 1) < 1e-5


def test_padding_stays_out_of_the_balancing_loss_and_gets_no_gradient_from_it(tiny_deepseek_v3):
    model, spec = tiny_deepseek_v3, ARCHITECTURES["deepseek_v3"]
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded tail, as packed rows end
    real = mask.reshape(-1).bool()
    routed = _router_outputs(model, ids)
    want = sum(load_balancing_loss(logits[real], index[real], 8, "sigmoid") for logits, index in routed.values()) / len(routed)

    probe = RouterProbe(model, spec)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    probe.reset(mask)
    model(inputs_embeds=embeds)
    torch.testing.assert_close(probe.aux_loss(), want)
    (grad,) = torch.autograd.grad(probe.aux_loss(), [embeds])
    assert grad[1, 7:].abs().max() == 0 and grad[1, :7].abs().max() > 0

    probe.reset()  # no mask: every token counts, the padded tail too
    model(inputs_embeds=embeds)
    (grad,) = torch.autograd.grad(probe.aux_loss(), [embeds])
    assert grad[1, 7:].abs().max() > 0


def test_the_accumulators_start_on_the_forwards_device(tiny_deepseek_v3):
    """Not a CPU scalar that turns into a device tensor at the first MoE layer: inside compiled decoder layers
    that change failed a guard and compiled the layer once more every stage."""
    probe = RouterProbe(tiny_deepseek_v3, ARCHITECTURES["deepseek_v3"])
    probe.reset(torch.ones(2, 5, device="meta"))
    assert probe._aux.device.type == probe._imbalance.device.type == "meta"
    probe.reset()
    assert probe._aux.device == next(tiny_deepseek_v3.parameters()).device
