"""dsft train compiles each decoder layer; layers that keep their activations compile under a memory budget."""
from __future__ import annotations

import torch
import torch._functorch.config as functorch_config

from dsft.kernels.compile import KEPT_MEMORY_BUDGET, compile_decoder_layers


def _tiny():
    from transformers import DeepseekV2ForCausalLM

    from dsft.base.presets import PRESETS

    return DeepseekV2ForCausalLM(PRESETS["tiny-deepseek-v2"].make_config(256))


def test_every_layer_compiles_and_the_budget_is_the_partitioners():
    model = _tiny()
    with functorch_config.patch(activation_memory_budget=1.0):  # restored after: the setting is process-wide
        compile_decoder_layers(model, KEPT_MEMORY_BUDGET)
        assert functorch_config.activation_memory_budget == KEPT_MEMORY_BUDGET < 1.0
        assert compile_decoder_layers(model) == len(model.model.layers)
        assert functorch_config.activation_memory_budget == 1.0  # no kept layers: the compiler's fastest choice again
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)


def test_a_compiled_layer_under_the_budget_keeps_less_and_computes_the_same():
    """The partitioner recomputes part of what the layer would keep; values and gradients do not change."""
    torch.manual_seed(0)
    x = torch.randn(1, 64, 32, requires_grad=True)
    lin = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.SiLU(), torch.nn.Linear(128, 128), torch.nn.SiLU(), torch.nn.Linear(128, 32))

    def kept_bytes_and_grad(budget: float) -> tuple[int, torch.Tensor]:
        torch._dynamo.reset()
        fn = torch.compile(lin, backend="aot_eager")
        sizes: list[int] = []
        with functorch_config.patch(activation_memory_budget=budget), \
                torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            y = fn(x)
        (g,) = torch.autograd.grad(y.square().sum(), [x])
        return sum(sizes), g

    full, g_full = kept_bytes_and_grad(1.0)
    less, g_less = kept_bytes_and_grad(0.5)
    assert less < full
    torch.testing.assert_close(g_less, g_full)
