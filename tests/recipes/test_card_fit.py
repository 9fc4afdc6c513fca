"""What fits on the card (dsft.recipes.card_fit): which layers keep their activations, and giving them back."""
from __future__ import annotations

from types import SimpleNamespace

from dsft.recipes.card_fit import recompute_every_layer, spare_recompute
from dsft.recipes.distributed import Dist


def test_keep_auto_keeps_every_layer_recomputing_on_a_4bit_base_and_gives_kept_layers_back_on_out_of_memory():
    """A QLoRA layer out of checkpointing would also hold its dequantised weights, which the plan does not count."""
    layers = [SimpleNamespace(gradient_checkpointing=True) for _ in range(3)]
    model = SimpleNamespace(get_decoder=lambda: SimpleNamespace(layers=layers))
    assert spare_recompute(model, "auto", None, None, True, 0, "cuda:0", Dist()) == 0
    assert all(layer.gradient_checkpointing for layer in layers)
    assert spare_recompute(model, 2, None, None, True, 0, "cuda:0", Dist()) == 2  # a count given is kept
    assert [layer.gradient_checkpointing for layer in layers] == [True, False, False]
    # a step ran out of memory: every layer recomputes again, and the record says how many had been kept
    assert recompute_every_layer(model, {"kept_layers": 2, "layers": 3}) == {"kept_layers": 0, "layers": 3, "out_of_memory_with": 2}
    assert all(layer.gradient_checkpointing for layer in layers)
    assert recompute_every_layer(model, {"kept_layers": 0, "layers": 3}) is None  # nothing left to give back
