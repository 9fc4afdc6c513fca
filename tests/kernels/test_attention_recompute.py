"""A kept layer's attention inputs recomputed in backward with the attention kernel's outputs kept
(:mod:`dsft.kernels.attention_recompute`): the same gradients as the plain layer, and backward runs the projections
again but not the attention kernel. On a GPU the kernel is one op (``torch_attn::_varlen_attn``); on the CPU SDPA
decomposes into many, so the test attends through a one-op stand-in with the same math."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy

from dsft.kernels.attention_recompute import keeps_attention_outputs, recompute_attention_inputs, restore_attention_inputs

CALLS = {"forward": 0}


@torch.library.custom_op("dsft_tests::causal_attention", mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    CALLS["forward"] += 1
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


@causal_attention.register_fake
def _(q, k, v, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def _setup(ctx, inputs, output):
    q, k, v, ctx.scale = inputs
    ctx.save_for_backward(q, k, v)


def _backward(ctx, grad):
    q, k, v = ctx.saved_tensors
    _, vjp = torch.func.vjp(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=ctx.scale), q, k, v)
    return (*vjp(grad), None)


causal_attention.register_autograd(_backward, setup_context=_setup)


def _one_op_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention signature through the one-op stand-in (rows of one example: causal)."""
    out = causal_attention(query, key, value, scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out.transpose(1, 2).contiguous(), None


@pytest.fixture
def model(tiny_deepseek_v3):
    from transformers import AttentionInterface

    AttentionInterface.register("dsft_tests_one_op", _one_op_attention)
    tiny_deepseek_v3.float().config._attn_implementation = "dsft_tests_one_op"
    return tiny_deepseek_v3


def _step(model, ids):
    CALLS["forward"] = 0
    loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # as training runs (a cache would grow on recompute)
    in_forward = CALLS["forward"]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, in_forward, CALLS["forward"] - in_forward


def test_same_gradients_without_running_the_attention_kernel_again(model):
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    layers = len(model.model.layers)
    plain_loss, plain_grads, forwards, again = _step(copy.deepcopy(model), ids)
    assert (forwards, again) == (layers, 0)

    wrapped = copy.deepcopy(model)
    for layer in wrapped.model.layers:
        recompute_attention_inputs(layer)
    loss, grads, forwards, again = _step(wrapped, ids)
    assert (forwards, again) == (layers, 0)  # backward recomputed the projections, and took the kernel's outputs kept
    assert torch.equal(loss, plain_loss) and grads.keys() == plain_grads.keys()
    assert all(torch.allclose(grads[n], plain_grads[n], atol=1e-6, rtol=1e-5) for n in grads)

    # the control: a policy that recomputes everything runs the kernel again in backward, once a layer
    everything = copy.deepcopy(model)
    for layer in everything.model.layers:
        recompute_attention_inputs(layer, policy=lambda ctx, op, *a, **k: CheckpointPolicy.PREFER_RECOMPUTE)
    _, grads, forwards, again = _step(everything, ids)
    assert (forwards, again) == (layers, layers)
    assert all(torch.allclose(grads[n], plain_grads[n], atol=1e-6, rtol=1e-5) for n in grads)


def test_the_policy_keeps_attention_kernels_and_recomputes_the_rest():
    keeps = [torch.ops.dsft_tests.causal_attention.default, torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._efficient_attention_forward.default]
    from dsft.kernels.varlen import kernel_available

    kernel_available()  # imports torch.nn.attention.varlen where this torch has it, which registers its op
    if hasattr(torch.ops.torch_attn, "_varlen_attn"):  # the kernel dsft trains with on a GPU (torch >= 2.9)
        keeps.append(torch.ops.torch_attn._varlen_attn.default)
    assert all(keeps_attention_outputs(None, op) == CheckpointPolicy.MUST_SAVE for op in keeps)
    recomputed = [torch.ops.aten.mm.default, torch.ops.aten.cat.default, torch.ops.aten._to_copy.default]
    assert all(keeps_attention_outputs(None, op) == CheckpointPolicy.PREFER_RECOMPUTE for op in recomputed)


def test_the_wrapped_attention_compiles_whole_with_the_same_gradients(model):
    """dsft train compiles each layer: the checkpointed region with its policy traces as one graph (no break), and
    the compiled backward still takes the kernel's outputs kept."""
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    plain_loss, plain_grads, _, _ = _step(copy.deepcopy(model), ids)
    for layer in model.model.layers:
        recompute_attention_inputs(layer)
        layer.self_attn.compile(fullgraph=True, backend="aot_eager")
    loss, grads, forwards, again = _step(model, ids)
    assert (forwards, again) == (len(model.model.layers), 0)
    assert torch.equal(loss, plain_loss)
    assert all(torch.allclose(grads[n], plain_grads[n], atol=1e-6, rtol=1e-5) for n in plain_grads)


def test_evaluation_without_gradients_runs_the_wrapped_attention_unchanged(model):
    """Held-out evaluation between training steps (``eval_every``) runs the wrapped layers without gradients, and
    generation may use a KV cache there: nothing is recomputed then, and the logits are the plain model's."""
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    wrapped = copy.deepcopy(model)
    for layer in wrapped.model.layers:
        recompute_attention_inputs(layer)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            want = model(input_ids=ids, use_cache=False).logits
            assert torch.equal(wrapped(input_ids=ids, use_cache=False).logits, want)
            assert torch.equal(wrapped(input_ids=ids, use_cache=True).logits, want)


def test_restoring_gives_the_class_forward_back(model):
    layer = model.model.layers[-1]
    recompute_attention_inputs(layer)
    assert "forward" in layer.self_attn.__dict__
    assert restore_attention_inputs(layer) and "forward" not in layer.self_attn.__dict__
    assert not restore_attention_inputs(layer)  # nothing left to undo
