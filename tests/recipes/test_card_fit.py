"""What fits on the card (dsft.recipes.card_fit): which layers keep their activations, whether their attention
recomputes its inputs, and giving them back."""
from __future__ import annotations

from types import SimpleNamespace

import torch

from dsft.kernels.attention_recompute import recompute_attention_inputs
from dsft.recipes.card_fit import keep_fewer_layers, spare_recompute
from dsft.recipes.distributed import Dist


def _wrapped(layer) -> bool:
    return "forward" in layer.self_attn.__dict__


def test_keep_auto_keeps_every_layer_recomputing_on_a_4bit_base_and_gives_half_the_kept_layers_back_on_out_of_memory(tiny_deepseek_v3):
    """A QLoRA layer out of checkpointing would also hold its dequantised weights, which the plan does not count."""
    layers = tiny_deepseek_v3.model.layers
    for layer in layers:
        layer.gradient_checkpointing = True
    assert spare_recompute(tiny_deepseek_v3, "auto", None, None, True, 0, "cuda:0", Dist()) == (0, False)
    assert all(layer.gradient_checkpointing for layer in layers)
    assert spare_recompute(tiny_deepseek_v3, 2, None, None, True, 0, "cuda:0", Dist()) == (2, False)  # a count given is kept
    assert [layer.gradient_checkpointing for layer in layers] == [True] * (len(layers) - 2) + [False, False]
    assert not any(_wrapped(layer) for layer in layers)  # plainly: a given count recomputes nothing unless asked
    # a step ran out of memory: half the kept layers recompute again (the first of them), and the record says how
    # many had been kept; again, and none keeps
    n = len(layers)
    record = keep_fewer_layers(tiny_deepseek_v3, {"kept_layers": 2, "layers": n, "attention_recomputed": False})
    assert record == {"kept_layers": 1, "layers": n, "attention_recomputed": False, "out_of_memory_with": 2}
    assert [layer.gradient_checkpointing for layer in layers] == [True] * (n - 1) + [False]
    record = keep_fewer_layers(tiny_deepseek_v3, record)
    assert record == {"kept_layers": 0, "layers": n, "attention_recomputed": False, "out_of_memory_with": 1}
    assert all(layer.gradient_checkpointing for layer in layers)
    assert keep_fewer_layers(tiny_deepseek_v3, record) is None  # nothing left to give back


def test_kept_layers_asked_to_recompute_attention_inputs_are_wrapped_and_unwrapped_when_given_back(tiny_deepseek_v3):
    layers = tiny_deepseek_v3.model.layers
    n = len(layers)
    assert spare_recompute(tiny_deepseek_v3, 2, None, None, False, 0, "cuda:0", Dist(), attention=True) == (2, True)
    assert [_wrapped(layer) for layer in layers] == [False] * (n - 2) + [True, True]
    record = keep_fewer_layers(tiny_deepseek_v3, {"kept_layers": 2, "layers": n, "attention_recomputed": True})
    assert record["attention_recomputed"] and [_wrapped(layer) for layer in layers] == [False] * (n - 1) + [True]
    record = keep_fewer_layers(tiny_deepseek_v3, record)
    assert not record["attention_recomputed"]
    assert not any(_wrapped(layer) for layer in layers)  # a layer that recomputes everything gains nothing from it
    assert spare_recompute(tiny_deepseek_v3, 0, None, None, False, 0, "cuda:0", Dist(), attention=True) == (0, False)


def test_keep_auto_recomputes_attention_inputs_where_that_keeps_enough_more_layers(monkeypatch, home):
    """The planner's choice (dsft.eval.plan.keep_plan) on a card that holds the tiny preset's 4 layers plainly, and
    on one that holds 2 plainly but more with their attention's inputs recomputed."""
    from dsft.base import load_base
    from dsft.eval.plan import PlanRequest, count_model, estimate_memory, kept_layer_bytes
    from dsft.recipes.schema import load_recipe

    loaded = load_base("tiny-deepseek-v2", device="cpu")
    rec = load_recipe("lora", ["stages.0.micro_batch_size=8", "stages.0.seq_len=2048"])
    counts = count_model(loaded.ref, lora_r=rec.adapter.r)
    req = PlanRequest("tiny-deepseek-v2", "lora", batch=8, seq=2048, lora_r=rec.adapter.r, new_terms=0)
    needed, plain = estimate_memory(counts, req)[0].total, kept_layer_bytes(counts, req, compiled=True)
    lean = kept_layer_bytes(counts, req, compiled=True, attention_recomputed=True)
    layers = loaded.model.get_decoder().layers

    def on_card(gib_room: float) -> tuple[int, bool]:
        for layer in layers:
            layer.gradient_checkpointing = True
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=(needed + gib_room) / 0.9))
        return spare_recompute(loaded.model, "auto", loaded.ref, rec, False, 0, "cuda:0", Dist())

    assert on_card(4.2 * plain) == (4, False) and not any(_wrapped(layer) for layer in layers)
    room = 2.9 * plain
    kept = int(room // lean)
    assert kept >= 3  # precondition: recomputing attention's inputs makes room for more than the 2 plain ones
    assert on_card(room) == (kept, True)
    assert [_wrapped(layer) for layer in layers] == [False] * (len(layers) - kept) + [True] * kept
    assert [layer.gradient_checkpointing for layer in layers] == [True] * (len(layers) - kept) + [False] * kept


def test_wrapping_twice_wraps_once(tiny_deepseek_v3):
    layer = tiny_deepseek_v3.model.layers[-1]
    recompute_attention_inputs(layer)
    first = layer.self_attn.forward
    recompute_attention_inputs(layer)
    assert layer.self_attn.forward is first
