"""Turn a stage's data sources (bundled domain corpora, general replay, user files) into token tensors."""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsft.data.files import Record, load_records
from dsft.data.mixture import apportion, mix_packed
from dsft.data.packing import SequenceSource, best_fit
from dsft.data.token_cache import RecordList, tokenized
from dsft.data.tokenize import Examples, pad_id
from dsft.data.user_data import GENERATED_SOURCES, USER_SOURCES, UserData
from dsft.errors import DataError
from dsft.eval.heldout import corpus, pair_records, raw_records
from dsft.recipes.schema import Phase, Stage
from dsft.recipes.sizing import on_cpu


def source_records(name: str, pack, general, user_records: UserData | Sequence[Record], as_text: bool) -> list[Record]:
    """The records of one named source (see :data:`dsft.recipes.schema.DATA_SOURCES`).

    ``user_records``: the run's :class:`~dsft.data.user_data.UserData` (``domain.user`` and ``user``), or
    a plain list of records, which is ``user``.

    Raises:
        DataError: a generated source with no records (a user domain whose terms have no definitions).
    """
    if isinstance(user_records, UserData):
        if name in USER_SOURCES:
            return user_records.records(name)
    elif name == "user":
        return list(user_records)
    elif name == "domain.user":
        return []
    dom = corpus(pack)
    if name == "domain.raw":
        records = raw_records(dom.raw_train)
    elif name == "domain.longtail":
        records = raw_records(dom.longtail_train)
    elif name == "domain.instruct":
        records = pair_records(dom.instruct_train, as_text)
    elif name == "general.raw":
        return raw_records(corpus(general).raw_train)
    elif name.startswith("file:"):
        return load_records([name.removeprefix("file:")])
    else:
        raise ValueError(name)
    if not records:
        raise DataError(f"domain {pack.name}: no generated {name} text (its terms have no definitions to write it from); "
                        f"give it your data (dsft train --domain {pack.name} --data FILE) or add definitions to its terms")
    return records


REPLAY_SOURCE = "general.raw"


def user_recipe(recipe: str | None) -> bool:
    """Whether ``--recipe`` is the user's own recipe file: its sources were chosen on purpose, so generated
    text it names trains beside the user's data (a built-in recipe names it only as the default)."""
    from dsft.recipes.schema import BUILTIN_DIR

    return recipe is not None and recipe.endswith((".yaml", ".yml")) and Path(recipe).resolve().parent != BUILTIN_DIR.resolve()


def phase_weights(stage: Stage, phase: Phase, user: UserData | bool) -> dict[str, float]:
    """A phase's mixture weights once the user's data is placed, and after the stage's general replay.

    With user data (``domain.user``: the domain's own files, ``user``: ``--data``), the pack's generated
    text (domain.raw / domain.instruct / domain.longtail) leaves the mixture and its weight goes, in equal
    shares, to the user sources the phase does not name (issue 20.1: a user's domain trains on the user's
    data); with ``keep_generated``, or in a phase without generated text, those user sources join weighing
    as much as the rest together. A user source the phase names keeps its weight; one without records
    drops out. Replay rescales the phase's own weights to ``1 - replay`` and gives ``replay`` to general.raw.

    Args:
        user: the run's user data, or (older callers) whether ``--data`` records exist.
    """
    if isinstance(user, bool):
        present, keep_generated = ("user",) if user else (), True
    else:
        present, keep_generated = tuple(s for s in USER_SOURCES if s in user.sources), user.keep_generated
    weights = {s.source: s.weight for s in phase.data if s.source not in USER_SOURCES or s.source in present}
    unnamed = [s for s in present if s not in weights]
    freed = 0.0 if keep_generated or not present else sum(weights.pop(s, 0.0) for s in GENERATED_SOURCES)
    if unnamed:
        share = (freed or sum(weights.values())) / len(unnamed)
        weights.update({s: share for s in unnamed})
    if stage.replay > 0:
        total = sum(weights.values())
        weights = {k: (1 - stage.replay) * w / total for k, w in weights.items()}
        weights[REPLAY_SOURCE] = weights.get(REPLAY_SOURCE, 0.0) + stage.replay
    return weights


def _placed(user_records: UserData | Sequence[Record]) -> UserData | bool:
    """What :func:`phase_weights` takes: the run's UserData, or (a plain list of ``--data`` records) whether there are any."""
    return user_records if isinstance(user_records, UserData) else bool(user_records)


def phase_steps(stage: Stage, steps: int) -> dict[str, int]:
    """Steps per phase (whole steps, largest remainder), in order; they sum to ``steps``."""
    return apportion({p.name: p.fraction for p in stage.mixtures}, steps)


def stage_steps(stage: Stage, pack, general, tokenizer, user_records: Sequence[Record]) -> int:
    """The stage's ``steps``, or for ``epochs``: epochs x the packed rows that all its examples fill, / batch_size
    (an unsized stage: the CPU's step, :func:`dsft.recipes.sizing.on_cpu`)."""
    if stage.steps is not None:
        return stage.steps
    stage = on_cpu(stage)
    as_text = stage.kind_spec.reads == "text"
    names = {n for phase in stage.mixtures for n in phase_weights(stage, phase, _placed(user_records))}
    lengths = [length for n in sorted(names)
               for length in tokenized(RecordList(source_records(n, pack, general, user_records, as_text)), tokenizer,
                                       stage.seq_len).lengths.tolist()]
    rows = len(best_fit(lengths, stage.seq_len))
    return max(1, math.ceil(stage.epochs * rows / stage.batch_size))


def example_lengths(stage: Stage, pack, general, tokenizer, user_records: Sequence[Record], sample: int) -> list[int]:
    """Token lengths of the stage's instruction and chat examples (the first ``sample`` of each source), as
    they would train uncut; empty for a stage of raw text (its rows are filled whole whatever the length)."""
    from itertools import islice

    from dsft.data.tokenize import encode_records

    as_text = stage.kind_spec.reads == "text"
    names = sorted({n for phase in stage.mixtures for n in phase_weights(stage, phase, _placed(user_records))})
    lengths: list[int] = []
    for name in names:
        records = (r for r in source_records(name, pack, general, user_records, as_text) if r.kind != "text")
        lengths += [len(x) for x, _ in encode_records(tokenizer, islice(records, sample), 1 << 62, {})]
    return lengths


@dataclass(frozen=True)
class StageData:
    """The packed rows of one stage in step order (phase after phase), and the realised mixture.

    Every step takes ``batch_size`` rows of ``seq_len`` tokens (fixed shapes: each layer compiles
    once); a row holds several instruction/chat examples (``position_ids`` restart per example) or
    one block of raw text.
    """

    examples: Examples
    realised: dict[str, int]
    """Examples per source over the whole stage."""
    phases: dict[str, dict[str, Any]]
    """Per phase: ``{"steps": n, "mixture": {source: examples}, "tokens": {source: tokens}}``."""
    realised_tokens: dict[str, int] = field(default_factory=dict)
    """Real (non-padding) tokens per source over the whole stage."""
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per source, what tokenising gave (:class:`dsft.data.tokenize.TokenizeStats` as JSON)."""

    @staticmethod
    def build(stage: Stage, pack, general, tokenizer, user_records: Sequence[Record], seed: int,
              steps: int | None = None) -> StageData:
        """Mix the stage's sources for ``steps`` steps (default: the stage's); the same seed gives the same data.
        An unsized stage (straight from a recipe file) takes the CPU's step (:func:`dsft.recipes.sizing.on_cpu`)."""
        stage = on_cpu(stage)
        steps = steps or stage_steps(stage, pack, general, tokenizer, user_records)
        as_text = stage.kind_spec.reads == "text"
        tokenised: dict[str, SequenceSource] = {}
        sources: dict[str, dict[str, Any]] = {}
        parts, realised, realised_tokens, phases = [], {}, {}, {}
        for k, (phase, n_steps) in enumerate(zip(stage.mixtures, phase_steps(stage, steps).values())):
            weights = phase_weights(stage, phase, _placed(user_records))
            for name in weights:
                if name not in tokenised:
                    records = source_records(name, pack, general, user_records, as_text)
                    # cached on disk by content: a second run (or stage) with the same data does not tokenise again
                    tokenised[name] = tokenized(RecordList(records), tokenizer, stage.seq_len)
                    sources[name] = tokenised[name].stats.to_json()
            phases[phase.name] = {"steps": n_steps, "mixture": {}, "tokens": {}}
            if n_steps == 0:
                continue
            mixed = mix_packed({n: tokenised[n] for n in weights}, weights, n_steps * stage.batch_size, stage.seq_len,
                               pad_id(tokenizer), seed + 1000 * k)
            parts.append(mixed.examples)
            phases[phase.name].update(mixture=mixed.counts, tokens=mixed.tokens)
            for name, c in mixed.counts.items():
                realised[name] = realised.get(name, 0) + c
                realised_tokens[name] = realised_tokens.get(name, 0) + mixed.tokens[name]
        return StageData(Examples.cat(parts, stage.seq_len), realised, phases, realised_tokens, sources)


def stage_batches(data: StageData, batch_size: int, device, shard: tuple[int, int] = (0, 1), *,
                  seq_lens: bool = False) -> Callable[[int], dict[str, torch.Tensor]]:
    """``batches(step)``: that step's packed rows (incl. ``position_ids``) on ``device``; resumable by step number.

    ``shard=(rank, world)``: only this rank's rows of each step's ``batch_size`` (the global batch), split
    as :func:`dsft.recipes.distributed.split_rows` does, so the ranks together see one step's examples.
    ``seq_lens``: also each row's example lengths (:func:`dsft.data.packing.row_lengths`, computed here on the
    host), with one number of slots for the whole stage so its batches keep one shape.
    """
    from dsft.data.packing import row_lengths, slots_needed
    from dsft.recipes.distributed import split_rows

    rank, world = shard
    slots = slots_needed(data.examples.position_ids) if seq_lens else 0
    # To a GPU through pinned memory, asynchronously: a copy from pageable memory waits for every kernel enqueued
    # before it, so taking a step's batch would wait for the previous step to end (the loop overlaps them).
    pinned = torch.device(device).type == "cuda"

    def batches(step: int) -> dict[str, torch.Tensor]:
        lo = step * batch_size
        n = min(batch_size, len(data.examples) - lo)
        mine = split_rows(n, rank, world)
        rows = {k: v[lo + mine.start : lo + mine.stop] for k, v in data.examples.to_dict().items()}
        if slots:
            rows["seq_lens"] = row_lengths(rows["position_ids"], slots)
        return {k: v.pin_memory().to(device, non_blocking=True) if pinned else v.to(device) for k, v in rows.items()}
    return batches
