"""The data plan printed before a stage: sources, rows, padding and the realised mixture."""
from __future__ import annotations

from dsft.data.mixture import mix_packed
from dsft.data.packing import Sequences
from dsft.recipes.data_plan import StagePlan, render
from dsft.recipes.sizing import StepSize
from dsft.recipes.sources import StageData


def test_the_plan_counts_rows_padding_and_the_realised_mixture():
    seqs = Sequences.from_lists([([5] * n, [5] * n) for n in (10, 12, 20, 9, 30)])
    mixed = mix_packed({"user": seqs}, {"user": 1.0}, rows=4, seq_len=32, pad_id=0, seed=0)
    stats = {"records": {"instruction": 6}, "examples": 5, "tokens": 81, "truncated": 1, "dropped": 1}
    data = StageData(mixed.examples, mixed.counts, {}, mixed.tokens, {"user": stats})

    plan = StagePlan.of("sft", data, steps=2, size=StepSize(32, 2, 2, ())).to_json()

    assert plan["rows"] == 4 and plan["seq_len"] == 32 and plan["heldout"] is None
    real = int(mixed.examples.attention_mask.sum())
    assert plan["padding_share"] == round(1 - real / (4 * 32), 4)
    assert plan["mixture"] == mixed.counts and plan["mixture_tokens"] == {"user": real}
    lines = render(plan)
    assert lines[0].startswith("data for stage sft: 4 rows of 32 tokens (2 steps x 2), padding ")
    assert "user: 6 instruction records -> 5 examples, 81 tokens, 1 truncated, 1 dropped" in lines[1]


def test_a_gpu_sized_step_says_what_was_chosen_and_how_it_accumulates():
    seqs = Sequences.from_lists([([5] * n, [5] * n) for n in (10, 12, 20, 9, 30)])
    mixed = mix_packed({"user": seqs}, {"user": 1.0}, rows=4, seq_len=32, pad_id=0, seed=0)
    data = StageData(mixed.examples, mixed.counts, {}, mixed.tokens, {})
    plan = StagePlan.of("sft", data, steps=1, size=StepSize(32, 4, 2, ("seq_len", "micro_batch_size"))).to_json()
    assert plan["micro_batch_size"] == 2 and plan["sized"] == ("seq_len", "micro_batch_size")
    assert render(plan)[0].startswith("data for stage sft: 4 rows of 32 tokens (1 steps x 4 in micro-batches of 2), padding ")
    assert render(plan)[0].endswith("; seq_len, micro_batch_size chosen for this device")
