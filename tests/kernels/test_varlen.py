"""Variable-length attention over packed rows: the examples' lengths from the host, offsets on the device, and a
model that attends through it gives what transformers' own packed-sequence mask gives (CPU: the SDPA reference
stands in for the CUDA kernel, the wiring around it is the same)."""
from __future__ import annotations

import pytest
import torch
import transformers

from dsft.base.presets import PRESETS
from dsft.data.packing import CU_KEY, model_inputs, pack_rows, row_lengths
from dsft.kernels import varlen


def _packed(layout: list[list[int]], seq: int, vocab: int = 400) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    examples = {n: torch.randint(3, vocab, (n,), generator=g) for row in layout for n in row}
    return pack_rows(lambda n: (examples[n], examples[n].clone()), layout, seq, pad_id=0)


def _model(preset: str, impl: str):
    config = PRESETS[preset].make_config(400)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float()
    if impl == varlen.VARLEN:
        varlen.register()
        model.set_attn_implementation(impl)
    return model


@pytest.mark.parametrize("preset", ["tiny-deepseek-v2", "tiny-qwen3-moe"])  # values narrower than keys; grouped keys
@pytest.mark.parametrize("offsets", ["seq_lens", "from positions"])
def test_a_model_attending_through_varlen_matches_transformers_packed_mask(preset, offsets):
    batch = _packed([[5, 9], [16], [7, 3, 4]], 16)
    if offsets == "seq_lens":
        batch["seq_lens"] = row_lengths(batch["position_ids"])
    results = []
    for impl in ("sdpa", varlen.VARLEN):  # sdpa: transformers builds the per-example mask from position_ids
        model = _model(preset, impl)
        inputs = model_inputs(batch)
        assert (CU_KEY in inputs) == (offsets == "seq_lens")
        hidden = model.model(**inputs, use_cache=False).last_hidden_state
        hidden.pow(2).mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if "self_attn" in n and p.grad is not None}
        results.append((hidden.detach(), grads))
    (h_ref, g_ref), (h, g) = results
    assert model.config._attn_implementation == varlen.VARLEN
    torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=1e-5)
    assert g.keys() == g_ref.keys() and g
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-4)


def test_examples_do_not_see_each_other():
    """The second example of a row gives the same output whatever the first one holds."""
    model = _model("tiny-deepseek-v2", varlen.VARLEN)
    a, b = _packed([[6, 10]], 16), _packed([[6, 10]], 16)
    b["input_ids"][0, :6] = torch.arange(10, 16)
    outs = []
    for batch in (a, b):
        batch["seq_lens"] = row_lengths(batch["position_ids"])
        outs.append(model.model(**model_inputs(batch), use_cache=False).last_hidden_state.detach())
    torch.testing.assert_close(outs[0][0, 6:], outs[1][0, 6:])
    assert not torch.allclose(outs[0][0, :6], outs[1][0, :6])


def test_what_the_kernel_does_not_compute_is_refused_in_one_line():
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(ValueError, match="does not support dropout"):
        varlen.attention_forward(torch.nn.Module(), q, q, q, None, dropout=0.1)
    with pytest.raises(ValueError, match="does not support sliding_window; train with DSFT_ATTENTION=flex_attention"):
        varlen.attention_forward(torch.nn.Module(), q, q, q, None, sliding_window=4)
    out, _ = varlen.attention_forward(torch.nn.Module(), q, q, q, None, sliding_window=None)  # a layer without one
    assert out.shape == (1, 4, 2, 8)
