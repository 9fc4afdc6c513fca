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


def test_a_diverged_step_is_never_handed_to_after_step(tiny_qwen2_moe):
    """The loop reads a step's loss only after the next step's forward and backward: step 3's NaN must still stop
    the run before step 3's ``after_step`` (a checkpoint, the registry) runs, and after steps 1 and 2 had theirs."""
    from dsft.base.arch import spec_for
    from dsft.base.router import RouterProbe
    from dsft.recipes.loop import default_loss, train_steps

    model = tiny_qwen2_moe
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    calls = []

    def nan_at_step_3(model, batch):
        calls.append(len(calls) + 1)
        objective, lm = default_loss(model, batch)
        return (objective * math.nan, lm * math.nan) if len(calls) == 3 else (objective, lm)

    reported, handed = [], []
    with pytest.raises(DivergedError, match="^step 3: the training loss is nan"):
        train_steps(model, torch.optim.SGD(model.parameters(), lr=1e-3), lambda step: batch, steps=6, peak_lrs=[1e-3],
                    warmup=0, schedule="constant", grad_clip=1.0, probe=RouterProbe(model, spec_for(model.config.model_type)),
                    loss_fn=nan_at_step_3, on_step=lambda info: reported.append(info.step),
                    after_step=lambda step, losses: handed.append((step, len(losses))))
    assert reported == [1, 2] and handed == [(1, 1), (2, 2)]
    assert calls == [1, 2, 3, 4]  # step 4's forward was under way when step 3's loss was read
