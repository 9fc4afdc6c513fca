"""How big a training step is: ``seq_len``, rows per optimizer step and rows per forward (micro-batch).

A stage may set any of ``seq_len``, ``batch_size`` (rows per optimizer step), ``tokens_per_step`` (the same
as a token budget) and ``micro_batch_size`` (rows per forward and backward; gradients accumulate over
``batch_size / micro_batch_size`` of them). What it leaves out is chosen here:

* on the CPU, today's small steps: 8 rows of 128 tokens, one forward per step (the README's main job
  stays a two-minute run);
* on a GPU, steps sized for the card: ``seq_len`` from the data (the 99th percentile example length,
  rounded up to 256, at most the base's context; 2,048 for raw text, which fills rows whole),
  :data:`GPU_TOKENS_PER_STEP` tokens per optimizer step, and a micro-batch that ``dsft plan``'s memory model
  fits on the card with 10% to spare (:func:`choose_micro_batch`: the largest one when every layer recomputes its
  activations; with ``--keep-layers auto``, the default, memory past :data:`SATURATING_TOKENS` a forward goes to
  keeping activations rather than to a bigger micro-batch).

Nothing here touches a model: the caller passes what it knows (example lengths, the card's bytes, a
memory estimate) so the choice is a pure function, tested on the CPU.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from dsft.errors import UsageError
from dsft.recipes.schema import Recipe, Stage

CPU_SEQ_LEN = 128
CPU_BATCH_SIZE = 8
GPU_TOKENS_PER_STEP = 32_768
"""Tokens per optimizer step on a GPU when the stage gives neither ``batch_size`` nor ``tokens_per_step``."""
GPU_RAW_SEQ_LEN = 2048
"""``seq_len`` of a raw-text stage on a GPU: continued pre-training fills every row, no length to follow."""
SEQ_ROUND = 256
PERCENTILE = 0.99
PLAN_MARGIN = 0.10
"""Share of the card a GPU-sized micro-batch leaves out of ``dsft plan``'s estimate (the model's error, fragmentation)."""
SATURATING_TOKENS = 8192
"""Tokens a forward from which, on a GPU, memory is better spent keeping layers' activations than growing the
micro-batch: recomputing them is a whole extra forward (on an H200, DeepSeek-V2-Lite shape at 4 x 2,048 packed
tokens: 21,504 tokens/s with every layer recomputed, 25,324 with 14 of 27 kept, 29,662 with none recomputed:
``benchmarks/results/2026-12-02-h200-train-keep.md``), while at 8,192 tokens the MoE's grouped GEMMs already have
~768 rows an expert (top-6 of 64)."""
SAMPLE = 4096
"""Examples whose lengths decide ``seq_len`` (the first ones of each source: enough for a 99th percentile)."""


@dataclass(frozen=True)
class StepSize:
    """One stage's step, resolved."""

    seq_len: int
    batch_size: int
    micro_batch_size: int
    chosen: tuple[str, ...]
    """The fields sized for the GPU here (empty on the CPU, whose defaults are fixed)."""
    world: int = 1

    @property
    def accumulation(self) -> int:
        """Forwards (and backwards) per optimizer step on each rank."""
        return -(-self.batch_size // self.world) // self.micro_batch_size

    def to_json(self) -> dict[str, object]:
        return {"seq_len": self.seq_len, "batch_size": self.batch_size, "micro_batch_size": self.micro_batch_size,
                "accumulation": self.accumulation, "chosen": list(self.chosen)}


def seq_len_from_lengths(lengths: Sequence[int], context: int | None) -> int:
    """The 99th percentile of ``lengths`` rounded up to a multiple of 256 (at least 256), at most ``context``."""
    if not lengths:
        return min(GPU_RAW_SEQ_LEN, context or GPU_RAW_SEQ_LEN)
    ordered = sorted(lengths)
    p = ordered[min(len(ordered) - 1, math.ceil(PERCENTILE * len(ordered)) - 1)]
    n = max(SEQ_ROUND, math.ceil(p / SEQ_ROUND) * SEQ_ROUND)
    return min(n, context) if context else n


def largest_micro_batch(rows: int, fits: Callable[[int], bool]) -> int:
    """The largest divisor ``m`` of ``rows`` with ``fits(m)`` (1 when none fits: the run may still fit
    where the model is pessimistic, and a too-large step fails with the card's own error)."""
    for m in sorted((d for d in range(1, rows + 1) if rows % d == 0), reverse=True):
        if fits(m):
            return m
    return 1


def choose_micro_batch(rows: int, seq: int, fits: Callable[[int], bool],
                       fits_kept: Callable[[int], bool] | None = None) -> int:
    """The micro-batch (a divisor of ``rows``) for ``seq``-token rows. ``fits(m)``: ``m`` rows fit with every layer
    recomputing its activations (checkpointing); ``fits_kept(m)``: they fit with none recomputing. Without
    ``fits_kept``: :func:`largest_micro_batch`. With it: the largest micro-batch that fits without recompute, if it
    reaches :data:`SATURATING_TOKENS` (or is all the rows); else the smallest one that reaches them, if it fits with
    checkpointing (the room left keeps as many layers as fit, :func:`dsft.eval.plan.layers_to_keep`); else, as
    without, the largest that fits."""
    divisors = [d for d in range(1, rows + 1) if rows % d == 0]
    if fits_kept is not None:
        kept = [m for m in divisors if fits_kept(m)]
        if kept and (kept[-1] * seq >= SATURATING_TOKENS or kept[-1] == rows):
            return kept[-1]
        enough = next((m for m in divisors if m * seq >= SATURATING_TOKENS), rows)
        if fits(enough):
            return enough
    return largest_micro_batch(rows, fits)


def size_stage(stage: Stage, *, cuda: bool, lengths: Callable[[], Sequence[int]] | None = None, context: int | None = None,
               fits: Callable[[int, int], bool] | None = None, fits_kept: Callable[[int, int], bool] | None = None,
               world: int = 1) -> StepSize:
    """The step of ``stage`` on this device.

    Args:
        cuda: whether it trains on a GPU (GPU sizing) or the CPU (small fixed defaults).
        lengths: the stage's example lengths (only called on a GPU when ``seq_len`` is not set); empty for raw text.
        context: the base's context length.
        fits: ``fits(micro_batch, seq_len)``: whether that forward and backward fit the card (GPU only), every
            layer recomputing its activations in backward.
        fits_kept: the same with no layer recomputing; given when the run keeps as many layers' activations as
            fit (``--keep-layers auto``), see :func:`choose_micro_batch`.
        world: ranks sharing each step (each takes ``batch_size / world`` rows of it).

    Raises:
        UsageError: ``micro_batch_size`` does not divide the rows each rank takes per step, or gradients
            would accumulate over ranks holding different numbers of rows.
    """
    chosen = []
    seq = stage.seq_len
    if seq is None:
        seq = seq_len_from_lengths(list(lengths()) if lengths else [], context) if cuda else CPU_SEQ_LEN
        chosen.append("seq_len")
    batch = stage.batch_size
    if batch is None:
        if cuda or stage.tokens_per_step:
            batch = max(1, (stage.tokens_per_step or GPU_TOKENS_PER_STEP) // seq)
        else:
            batch = CPU_BATCH_SIZE
        batch = max(world, batch // world * world)  # every rank takes the same number of rows
        if stage.micro_batch_size and not stage.tokens_per_step:
            # a micro-batch the recipe sets, under the default budget: whole ones each rank, the nearest to it (a
            # budget the recipe sets stays exact, and must hold whole micro-batches: the check below)
            unit = stage.micro_batch_size * world
            batch = max(unit, round(batch / unit) * unit)
        chosen.append("batch_size")
    rows = -(-batch // world)
    micro = stage.micro_batch_size
    if micro is None:
        if cuda and fits and batch % world == 0:
            micro = choose_micro_batch(rows, seq, lambda m: fits(m, seq), (lambda m: fits_kept(m, seq)) if fits_kept else None)
        else:
            micro = rows
        chosen.append("micro_batch_size")
    micro = min(micro, rows)
    if micro < rows and (batch % world or rows % micro):
        raise UsageError(f"stage {stage.name}: micro_batch_size {micro} must divide the rows each of the {world} "
                         f"rank(s) takes per step (batch_size {batch} / {world}); change batch_size or micro_batch_size")
    return StepSize(seq, batch, micro, tuple(chosen) if cuda else (), world)


def on_cpu(stage: Stage) -> Stage:
    """``stage`` with the CPU's step wherever it sets none (a stage straight from :func:`load_recipe`, used
    through the Python API without a run to size it)."""
    if None not in (stage.seq_len, stage.batch_size, stage.micro_batch_size):
        return stage
    z = size_stage(stage, cuda=False)
    return replace(stage, seq_len=z.seq_len, batch_size=z.batch_size, micro_batch_size=z.micro_batch_size)


def sized(recipe: Recipe, sizes: Sequence[StepSize]) -> Recipe:
    """``recipe`` with every stage's step fields set (what the run trains and records)."""
    stages = tuple(replace(s, seq_len=z.seq_len, batch_size=z.batch_size, micro_batch_size=z.micro_batch_size)
                   for s, z in zip(recipe.stages, sizes))
    return replace(recipe, stages=stages)
