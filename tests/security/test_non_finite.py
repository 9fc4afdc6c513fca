"""Issue 15.6: non-finite numbers are refused in every config, and a loss that becomes non-finite stops training."""
from __future__ import annotations

import math

import pytest
import torch
from security_helpers import one_error_line

from dsft.errors import DivergedError


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan", "1e400"])
def test_a_non_finite_number_in_a_recipe_is_refused_before_any_work(dsft, home, value):
    line = one_error_line(dsft("train", f"stages.0.lr={value}", "--max-steps", "1"))
    assert "stages[0].lr: must be a finite number" in line
    assert not (home / "registry.db").exists() or not (home / "adapters").exists()


def test_a_loss_that_becomes_non_finite_stops_the_loop(tiny_qwen2_moe):
    from dsft.base.arch import spec_for
    from dsft.base.router import RouterProbe
    from dsft.recipes.loop import train_steps

    model = tiny_qwen2_moe
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = []
    with pytest.raises(DivergedError, match="not a finite number") as err:
        # an absurd learning rate: the weights overflow after the first step and the loss turns NaN
        train_steps(model, optimizer, lambda step: batch, steps=5, peak_lrs=[1e38], warmup=0, schedule="constant",
                    grad_clip=0.0, probe=RouterProbe(model, spec_for(model.config.model_type)),
                    on_step=lambda info: seen.append(info.loss))
    assert "step " in str(err.value) and "registered nothing" in str(err.value)
    assert seen and all(math.isfinite(x) for x in seen)  # the steps reported before the stop were finite
