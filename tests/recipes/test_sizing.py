"""How big a step is: the CPU's fixed small steps, the GPU's steps sized from the data and the card, and
gradient accumulation over micro-batches equal to one forward over the whole step."""
from __future__ import annotations

import pytest
import torch

from dsft.errors import UsageError
from dsft.recipes.schema import load_recipe
from dsft.recipes.sizing import (
    CPU_BATCH_SIZE,
    CPU_SEQ_LEN,
    GPU_RAW_SEQ_LEN,
    GPU_TOKENS_PER_STEP,
    SATURATING_TOKENS,
    choose_micro_batch,
    largest_micro_batch,
    seq_len_from_lengths,
    size_stage,
)


def _stage(*overrides: str):
    return load_recipe("lora", list(overrides)).stages[0]


def test_the_cpu_keeps_its_small_fixed_step_unless_the_recipe_says_otherwise():
    size = size_stage(_stage(), cuda=False)
    assert (size.seq_len, size.batch_size, size.micro_batch_size, size.accumulation) == (CPU_SEQ_LEN, CPU_BATCH_SIZE, CPU_BATCH_SIZE, 1)
    assert size.chosen == ()
    size = size_stage(_stage("stages.0.seq_len=64", "stages.0.tokens_per_step=512", "stages.0.micro_batch_size=2"), cuda=False)
    assert (size.seq_len, size.batch_size, size.micro_batch_size, size.accumulation) == (64, 8, 2, 4)


def test_seq_len_follows_the_99th_percentile_rounded_up_to_256_within_the_context():
    lengths = [300] * 990 + [5000] * 10  # the longest 1% does not decide
    assert seq_len_from_lengths(lengths, context=32768) == 512
    assert seq_len_from_lengths([40] * 100, context=32768) == 256
    assert seq_len_from_lengths([9000] * 100, context=4096) == 4096
    assert seq_len_from_lengths([], context=32768) == GPU_RAW_SEQ_LEN  # raw text fills rows whole


def test_a_gpu_step_holds_the_token_budget_in_the_largest_micro_batch_that_fits():
    fits = lambda m, seq: m * seq <= 8 * 2048  # a card that holds 8 rows of 2048  # noqa: E731
    size = size_stage(_stage(), cuda=True, lengths=lambda: [1500] * 100, context=32768, fits=fits)
    assert size.seq_len == 1536 and size.batch_size == GPU_TOKENS_PER_STEP // 1536
    assert size.batch_size % size.micro_batch_size == 0 and size.micro_batch_size * 1536 <= 8 * 2048
    assert size.chosen == ("seq_len", "batch_size", "micro_batch_size")
    # what the recipe sets is kept; only the rest is chosen
    size = size_stage(_stage("stages.0.seq_len=4096", "stages.0.batch_size=12"), cuda=True, context=32768, fits=fits)
    assert (size.seq_len, size.batch_size, size.micro_batch_size, size.accumulation) == (4096, 12, 4, 3)
    assert size.chosen == ("micro_batch_size",)
    # a micro-batch the recipe sets with the batch left open: the step takes whole micro-batches, as near the
    # token budget as they come (not the budget's 5 rows of 6,144 with the micro-batch cut to 5)
    size = size_stage(_stage("stages.0.seq_len=6144", "stages.0.micro_batch_size=8"), cuda=True, context=32768, fits=fits)
    assert (size.batch_size, size.micro_batch_size, size.chosen) == (8, 8, ("batch_size",))
    size = size_stage(_stage("stages.0.seq_len=512", "stages.0.micro_batch_size=24"), cuda=True, context=32768, fits=fits)
    assert (size.batch_size, size.micro_batch_size) == (72, 24)  # the budget's 64 rows, rounded to whole micro-batches
    size = size_stage(_stage("stages.0.seq_len=512", "stages.0.micro_batch_size=3"), cuda=False, world=2)
    assert size.batch_size % 6 == 0 and size.micro_batch_size == 3
    with pytest.raises(UsageError, match="micro_batch_size 3 must divide"):  # a budget the recipe sets stays exact
        size_stage(_stage("stages.0.seq_len=512", "stages.0.tokens_per_step=4096", "stages.0.micro_batch_size=3"), cuda=True,
                   context=32768, fits=fits)


def test_two_ranks_split_each_step_evenly_and_a_micro_batch_must_divide_a_ranks_rows():
    size = size_stage(_stage(), cuda=True, lengths=lambda: [200] * 10, context=4096, fits=lambda m, s: m <= 16, world=2)
    assert size.batch_size % 2 == 0 and (size.batch_size // 2) % size.micro_batch_size == 0
    with pytest.raises(UsageError, match="micro_batch_size 3 must divide"):
        size_stage(_stage("stages.0.batch_size=8", "stages.0.micro_batch_size=3"), cuda=False, world=2)
    assert largest_micro_batch(12, lambda m: m <= 5) == 4
    assert largest_micro_batch(7, lambda m: False) == 1


def test_keep_auto_spends_memory_past_a_saturating_forward_on_kept_activations_not_a_bigger_micro_batch():
    assert SATURATING_TOKENS == 4 * 2048
    recomputing = lambda m: m <= 16  # every layer recomputing, 16 rows of 2,048 fit  # noqa: E731
    assert choose_micro_batch(16, 2048, recomputing) == 16  # layers counted by hand: the largest, as before
    assert choose_micro_batch(16, 2048, recomputing, lambda m: m <= 8) == 8  # 16k tokens with no recompute at all
    # no recompute only at 2 rows (4k tokens): 4 rows, whose spare memory keeps what layers it can
    assert choose_micro_batch(16, 2048, recomputing, lambda m: m <= 2) == 4
    assert choose_micro_batch(16, 2048, lambda m: m <= 2, lambda m: m <= 1) == 2  # 4 rows fit no way: the largest that does
    assert choose_micro_batch(3, 512, recomputing, lambda m: True) == 3  # every row fits and still under 8k tokens
    # through size_stage: fits_kept is what --keep-layers auto passes
    size = size_stage(_stage("stages.0.seq_len=2048", "stages.0.batch_size=16"), cuda=True, context=32768,
                      fits=lambda m, seq: m <= 16, fits_kept=lambda m, seq: m * seq <= 2 * 2048)
    assert (size.micro_batch_size, size.accumulation) == (4, 4)


def test_the_recipe_refuses_a_batch_size_and_a_token_budget_together():
    with pytest.raises(UsageError, match="tokens_per_step"):
        _stage("stages.0.batch_size=8", "stages.0.tokens_per_step=4096")
    with pytest.raises(UsageError, match="micro_batch_size"):
        _stage("stages.0.batch_size=4", "stages.0.micro_batch_size=8")


def test_accumulating_over_micro_batches_gives_the_gradient_of_one_forward_over_the_step(tiny_qwen2_moe):
    """Rows with different numbers of labelled tokens: the step's loss is a token mean, so micro-batches
    weigh by their tokens. (The router's load-balancing loss is not linear in the batch: with micro-batches
    it is their mean, as in Megatron; it is switched off here to compare the LM gradients exactly.)"""
    from dsft.base.arch import spec_for
    from dsft.base.router import RouterProbe
    from dsft.recipes.loop import train_steps

    model = tiny_qwen2_moe
    spec = spec_for(model.config.model_type, model.config.architectures)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 400, (4, 24), generator=g)
    labels = ids.clone()
    labels[0, :20] = -100  # row 0 takes loss on 4 positions, the others on all
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def one_step(micro):
        model.load_state_dict(start)
        for name, p in model.named_parameters():
            p.requires_grad_("mlp.gate" not in name)
        seen = {}
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
        opt.register_step_pre_hook(lambda o, a, k: seen.update(
            {id(p): p.grad.clone() for group in o.param_groups for p in group["params"] if p.grad is not None}))
        probe = RouterProbe(model, spec)
        probe.coef = 0.0
        try:
            losses = train_steps(model, opt, lambda step: batch, steps=1, peak_lrs=[0.0], warmup=0, schedule="constant",
                                 grad_clip=0.0, probe=probe, micro_batch=micro)
        finally:
            probe.close()
        return losses[0], seen

    whole, grads_whole = one_step(None)
    split, grads_split = one_step(1)
    assert split == pytest.approx(whole, rel=1e-5)
    assert grads_whole.keys() == grads_split.keys() and grads_whole
    for k in grads_whole:
        torch.testing.assert_close(grads_split[k], grads_whole[k], rtol=1e-4, atol=1e-7)
