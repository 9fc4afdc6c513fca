"""The training loop reads a step's figures only once the next step's forward and backward are enqueued (so a GPU
never waits for the host between steps): the run, what each step reports and what ``after_step`` sees (weights,
optimizer state, RNG) are those of a loop that reads every step before starting the next."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from dsft.base.arch import spec_for
from dsft.base.router import RouterProbe
from dsft.recipes.loop import StepInfo, _Enqueued, _rng_state, default_loss, train_steps

STEPS = 5


def _batches(vocab: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (STEPS, 2, 16), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 1, 12:] = 0  # a padded tail: a step's tokens are its mask's
    return lambda step: {"input_ids": ids[step], "attention_mask": mask[step], "labels": ids[step].masked_fill(mask[step] == 0, -100)}


def _noisy_loss(model, batch):
    """The LM loss on a random fifth of the labels dropped, as dropout would drop activations: each step draws from
    torch's RNG."""
    return default_loss(model, {**batch, "labels": batch["labels"].masked_fill(torch.rand(batch["labels"].shape) < 0.2, -100)})


def _run(model, start: dict, *, steps=STEPS, start_step=0, optimizer_state=None, rng=None, **kwargs):
    """Train ``model`` from weights ``start``; returns the losses, each StepInfo, and what each ``after_step``
    saw: (steps done, losses so far, a copy of the weights, the optimizer's state, torch's RNG)."""
    model.load_state_dict(start)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    if rng is not None:
        torch.set_rng_state(rng)
    infos, after = [], []

    def after_step(done, losses):
        after.append((done, list(losses), copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict()),
                      torch.get_rng_state()))

    probe = RouterProbe(model, spec_for(model.config.model_type))
    try:
        losses = train_steps(model, optimizer, _batches(model.config.vocab_size), steps=steps, peak_lrs=[1e-3], warmup=2,
                             schedule="cosine", grad_clip=1.0, probe=probe, start_step=start_step, loss_fn=_noisy_loss,
                             on_step=infos.append, after_step=after_step, **kwargs)
    finally:
        probe.close()
    return losses, infos, after


def _without_speed(info: StepInfo) -> StepInfo:
    return dataclasses.replace(info, tokens_per_s=0.0)


def test_reading_each_step_later_changes_nothing_in_the_run(tiny_qwen2_moe):
    model = tiny_qwen2_moe
    start = copy.deepcopy(model.state_dict())
    torch.manual_seed(7)
    losses, infos, after = _run(model, start)
    # A before_step finishes the step before it: each step is read before the next starts, as the loop once did.
    torch.manual_seed(7)
    one_at_a_time = _run(model, start, before_step=lambda step: None)

    assert losses == one_at_a_time[0] and len(losses) == STEPS
    assert [_without_speed(i) for i in infos] == [_without_speed(i) for i in one_at_a_time[1]]
    assert [i.step for i in infos] == list(range(1, STEPS + 1))
    assert [i.lr for i in infos][:3] == [5e-4, 1e-3, 1e-3]  # warm-up, then the cosine from the peak
    assert all(i.tokens_per_s > 0 and i.grad_norm is not None and i.imbalance >= 1.0 for i in infos)
    for (done, seen, weights, optim, rng), (done_1, seen_1, weights_1, optim_1, rng_1) in zip(after, one_at_a_time[2]):
        assert done == done_1 and seen == seen_1 == losses[:done]
        assert all(torch.equal(weights[k], weights_1[k]) for k in weights)
        assert optim["state"].keys() == optim_1["state"].keys()
        assert all(torch.equal(v, optim_1["state"][i][k]) for i, s in optim["state"].items() for k, v in s.items())
        assert [g["lr"] for g in optim["param_groups"]] == [g["lr"] for g in optim_1["param_groups"]]
        assert torch.equal(rng, rng_1)


def test_what_after_step_sees_resumes_the_run_exactly(tiny_qwen2_moe):
    """A checkpoint written by ``after_step(2)`` holds step 2's weights, optimizer state and RNG, though the loop
    has run step 3's forward and backward (and drawn from the RNG) by then: resumed from it, the run ends the same."""
    model = tiny_qwen2_moe
    start = copy.deepcopy(model.state_dict())
    torch.manual_seed(7)
    losses, _, after = _run(model, start)
    done, _, weights, optim, rng = after[1]
    assert done == 2

    resumed, infos, _ = _run(model, weights, start_step=2, optimizer_state=optim, rng=rng)
    assert resumed == losses[2:] and [i.step for i in infos] == [3, 4, 5]
    torch.manual_seed(7)
    two_steps, _, _ = _run(model, start, steps=2)
    assert all(torch.equal(model.state_dict()[k], weights[k]) for k in weights)  # the weights after exactly 2 steps
    assert two_steps == losses[:2]


def test_a_step_read_later_keeps_its_tensor_on_the_cpu_and_its_rng():
    figures = torch.tensor([2.5, 0.0, 1.0, 30.0, 1.25], dtype=torch.float64)
    rng = _rng_state()
    done = _Enqueued.of(4, 0.5, False, True, figures, rng)
    torch.rand(3)  # the next step draws
    after = torch.get_rng_state()
    assert done.ready is None and done.figures is figures and done.read() == [2.5, 0.0, 1.0, 30.0, 1.25]
    with done.rng_as_left():
        assert torch.equal(torch.get_rng_state(), rng[0])
    assert torch.equal(torch.get_rng_state(), after)


def test_a_stage_trained_through_varlen_attention_takes_the_packed_mask_steps(tiny_qwen2_moe):
    """``stage_batches(seq_lens=True)`` gives each step its examples' lengths; the loop's micro-batches slice them
    with the rows, and a model attending through variable-length attention (CPU: its SDPA reference) takes the
    steps transformers' per-example mask takes."""
    from dsft.data.packing import best_fit, pack_rows
    from dsft.data.tokenize import Examples
    from dsft.kernels.varlen import VARLEN, register
    from dsft.recipes.sources import StageData, stage_batches

    g = torch.Generator().manual_seed(0)
    lengths = [int(n) for n in torch.randint(3, 14, (24,), generator=g)]
    examples = [torch.randint(3, 400, (n,), generator=g) for n in lengths]
    packed = pack_rows(lambda i: (examples[i], examples[i].clone()), best_fit(lengths, 16)[:8], 16, pad_id=0)
    data = StageData(Examples(packed["input_ids"], packed["labels"], packed["attention_mask"], packed["position_ids"]), {}, {})
    start = copy.deepcopy(tiny_qwen2_moe.state_dict())
    register()
    runs = {}
    for impl, seq_lens in (("sdpa", False), (VARLEN, True)):
        model = tiny_qwen2_moe
        model.load_state_dict(start)
        model.set_attn_implementation(impl)
        batches = stage_batches(data, 4, "cpu", seq_lens=seq_lens)
        assert ("seq_lens" in batches(0)) == seq_lens
        probe = RouterProbe(model, spec_for(model.config.model_type))
        try:
            runs[impl] = train_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-2), batches, steps=2,
                                     peak_lrs=[1e-2], warmup=0, schedule="constant", grad_clip=1.0, probe=probe,
                                     micro_batch=2)
        finally:
            probe.close()
    model.set_attn_implementation("sdpa")
    assert runs[VARLEN] == pytest.approx(runs["sdpa"], rel=1e-5)
    assert runs["sdpa"][1] < runs["sdpa"][0]


def test_a_step_out_of_gpu_memory_runs_again_whole_once_memory_is_freed(tiny_qwen2_moe):
    """``on_out_of_memory`` frees memory (``dsft train``: layers kept by ``--keep-layers auto`` recompute again) and the
    step runs again from its first micro-batch, the gradients of the failed attempt dropped: the run is the run that
    never failed. Without relief the error stands."""
    model = tiny_qwen2_moe
    start = copy.deepcopy(model.state_dict())

    def run(fail_at: int | None = None, relief: bool | None = True):
        model.load_state_dict(start)
        calls, asked = [0], []

        def loss_fn(m, part):
            calls[0] += 1
            if calls[0] == fail_at:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.56 GiB")
            return default_loss(m, part)

        probe = RouterProbe(model, spec_for(model.config.model_type))
        try:
            losses = train_steps(model, torch.optim.AdamW(model.parameters(), lr=1e-3), _batches(model.config.vocab_size),
                                 steps=STEPS, peak_lrs=[1e-3], warmup=2, schedule="cosine", grad_clip=1.0, probe=probe,
                                 loss_fn=loss_fn, micro_batch=1,
                                 on_out_of_memory=None if relief is None else lambda: asked.append(1) or relief)
        finally:
            probe.close()
        return losses, asked, copy.deepcopy(model.state_dict())

    want, _, weights = run()
    # two micro-batches a step: the 6th forward is step 3's second, after its first one's backward added gradients
    got, asked, got_weights = run(fail_at=6)
    assert got == want and asked == [1]
    assert all(torch.equal(got_weights[k], weights[k]) for k in weights)
    with pytest.raises(torch.OutOfMemoryError):
        run(fail_at=6, relief=False)  # nothing left to free
    with pytest.raises(torch.OutOfMemoryError):
        run(fail_at=2, relief=None)  # no handler
