"""Synthetic domain corpora from a pack: raw documents, instruction pairs, held-out splits and a long tail.

Everything is drawn from ``random.Random`` instances seeded from ``seed`` (never the global RNG),
so the same pack and seed give byte-identical corpora on every run. Topic terms are drawn with
Zipf weights over a seeded ranking of the pack's terms, which gives the head-and-long-tail shape
of real domain text; ``longtail_train`` then targets the rarest fifth of the terms.
"""
from __future__ import annotations

import random
import string
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate, chain
from typing import TypeVar

from dsft.domains.catalog import builtin_pack, general_pack
from dsft.domains.pack import BUILTIN_DOMAINS, DomainPack, capitalise

ZIPF_EXPONENT = 1.0
ZIPF_OFFSET = 5.0
"""Zipf-Mandelbrot weight ``1 / (rank + offset) ** exponent``: the offset keeps the top term near 5% of
documents instead of ~17% (plain Zipf over ~200 terms), while the tail terms stay rare (~0.15% each)."""
LONGTAIL_FRACTION = 0.2
SENTENCES_PER_DOC = (3, 6)
SECOND_TOPIC_PROBABILITY = 0.2
"""Chance that a sentence of a document is about the document's second term rather than its topic."""

T = TypeVar("T")


@dataclass(frozen=True)
class DomainCorpus:
    raw_train: tuple[str, ...]
    raw_heldout: tuple[str, ...]
    """Documents from the same distribution as ``raw_train``; none of them occurs in it."""
    instruct_train: tuple[dict[str, str], ...]
    """``{"prompt": ..., "response": ...}`` pairs."""
    instruct_heldout: tuple[dict[str, str], ...]
    """Pairs whose prompts never occur in ``instruct_train``."""
    longtail_train: tuple[str, ...]
    """Documents about the ``longtail_terms`` only."""
    longtail_terms: tuple[str, ...] = ()
    """The least likely 20% of terms under the seeded Zipf sampling (at least one)."""


@lru_cache(maxsize=4096)
def _fields(template: str) -> tuple[str, ...]:
    """The placeholder names of a template, in order of appearance, each once (already validated by the loader)."""
    return tuple(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(template) if f))


class _Writer:
    """Fills a pack's templates; ``rng`` decides every choice, in a fixed order."""

    def __init__(self, pack: DomainPack, seed: int):
        self.pack = pack
        self.fillers = dict(pack.fillers)
        # The Zipf rank of a term is a seeded shuffle of file order, so the head is not just the first terms written.
        ranked = list(pack.terms)
        random.Random(f"{seed}:rank").shuffle(ranked)
        self.ranked = ranked
        self.cum_weights = list(accumulate(1.0 / (rank + ZIPF_OFFSET) ** ZIPF_EXPONENT for rank in range(len(ranked))))
        n_tail = max(1, round(len(ranked) * LONGTAIL_FRACTION))
        self.tail = ranked[len(ranked) - n_tail :]

    def topic(self, rng: random.Random) -> tuple[str, str]:
        return rng.choices(self.ranked, cum_weights=self.cum_weights)[0]

    def other(self, rng: random.Random, term: tuple[str, str]) -> tuple[str, str]:
        for _ in range(8):  # a head term is often drawn twice in a row; a few retries avoid "X differs from X"
            second = self.topic(rng)
            if second != term:
                return second
        return second

    def fill(self, rng: random.Random, templates: tuple[str, ...], term: tuple[str, str], second: tuple[str, str]) -> tuple[str, ...]:
        """Fill ``templates`` with one shared set of values (so a prompt and its response agree)."""
        values = {
            "term": term[0], "Term": capitalise(term[0]), "definition": term[1],
            "term2": second[0], "Term2": capitalise(second[0]), "definition2": second[1],
        }
        for template in templates:
            for name in _fields(template):
                if name not in values:
                    base = name[0].lower() + name[1:]  # {Org} is {org} capitalised, and the same org
                    if base not in values:
                        values[base] = rng.choice(self.fillers[base])
                    values[name] = values[base] if name == base else capitalise(values[base])
        return tuple(capitalise(t.format_map(values)) for t in templates)

    def document(self, rng: random.Random, term: tuple[str, str] | None = None) -> str:
        term = term or self.topic(rng)
        second = self.other(rng, term)
        n = rng.randint(*SENTENCES_PER_DOC)
        templates = self.pack.raw_templates
        chosen = rng.sample(templates, n) if len(templates) >= n else [rng.choice(templates) for _ in range(n)]
        sentences = []
        for template in chosen:
            about, mention = (second, term) if rng.random() < SECOND_TOPIC_PROBABILITY else (term, second)
            if not _fits((template,), about, mention):
                usable = [t for t in templates if _fits((t,), about, mention)]
                if not usable:
                    continue
                template = rng.choice(usable)
            sentences.extend(self.fill(rng, (template,), about, mention))
        return " ".join(sentences)

    def instruction(self, rng: random.Random) -> dict[str, str] | None:
        """One pair, or None when no template fits the drawn terms (it needs a definition they lack)."""
        term = self.topic(rng)
        second = self.other(rng, term)
        usable = [t for t in self.pack.instruction_templates if _fits((t.prompt, t.response), term, second)]
        if not usable:
            return None
        template = rng.choice(usable)
        prompt, response = self.fill(rng, (template.prompt, template.response), term, second)
        return {"prompt": prompt, "response": response}


def _fits(templates: tuple[str, ...], term: tuple[str, str], second: tuple[str, str]) -> bool:
    """Whether the templates can be filled without a definition the terms lack: a term the user gave no
    definition never gets an invented one (issue 20.1)."""
    fields = {f for t in templates for f in _fields(t)}
    return not ("definition" in fields and not term[1] or "definition2" in fields and not second[1])


def _split(
    draw: Callable[[], T], key: Callable[[T], Hashable], n: int, heldout_fraction: float, rng: random.Random
) -> tuple[tuple[T, ...], tuple[T, ...]]:
    """Draw ``n`` items, then split off a seeded held-out share whose keys never occur in the train share.

    A held-out item equal to a train item (a short prompt about a head term is often drawn twice)
    would measure memorisation, so such items are redrawn; at most ``20 * n_heldout`` extra draws.
    """
    items = [draw() for _ in range(n)]
    rng.shuffle(items)
    n_heldout = min(n, round(n * heldout_fraction))
    train, candidates = items[n_heldout:], iter(items[:n_heldout])
    taken = {key(item) for item in train}
    extra: Iterator[T] = (draw() for _ in range(20 * n_heldout))
    heldout: list[T] = []
    for item in chain(candidates, extra):
        if len(heldout) == n_heldout:
            break
        if key(item) not in taken:
            taken.add(key(item))
            heldout.append(item)
    return tuple(train), tuple(heldout)


def generate_corpus(
    pack: DomainPack, seed: int = 0, n_raw: int = 2000, n_instruct: int = 2000, heldout_fraction: float = 0.1,
    n_longtail: int | None = None,
) -> DomainCorpus:
    """Generate a pack's synthetic corpus.

    Args:
        pack: the domain pack (terms, fillers, templates).
        seed: the same seed gives byte-identical output.
        n_raw: raw documents drawn before the held-out split (train gets the rest).
        n_instruct: instruction pairs drawn before the held-out split.
        heldout_fraction: share of each kind held out, in [0, 1).
        n_longtail: documents about the long-tail terms; default ``n_raw // 10``.

    Returns:
        DomainCorpus; each raw document is 3-6 sentences about one topic term, sometimes mixing in a second.

    Raises:
        ValueError: a negative count or a fraction outside [0, 1).
    """
    if n_raw < 0 or n_instruct < 0 or (n_longtail is not None and n_longtail < 0):
        raise ValueError(f"counts must be >= 0, got n_raw={n_raw}, n_instruct={n_instruct}, n_longtail={n_longtail}")
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    writer = _Writer(pack, seed)
    # One RNG per part: asking for more instruction pairs does not change the raw documents.
    raw_rng, instruct_rng, tail_rng = (random.Random(f"{seed}:{part}") for part in ("raw", "instruct", "longtail"))
    raw_train, raw_heldout = _split(lambda: writer.document(raw_rng), lambda d: d, n_raw, heldout_fraction, raw_rng)
    instruct_train, instruct_heldout = _split(
        lambda: writer.instruction(instruct_rng), lambda p: p and p["prompt"], n_instruct, heldout_fraction, instruct_rng
    )
    # Drawn pairs no template fitted (terms without definitions) are dropped, not replaced by placeholder text.
    instruct_train, instruct_heldout = (tuple(p for p in part if p) for part in (instruct_train, instruct_heldout))
    n_longtail = n_raw // 10 if n_longtail is None else n_longtail
    tail = writer.tail
    longtail = tuple(writer.document(tail_rng, tail[i % len(tail)]) for i in range(n_longtail))
    return DomainCorpus(raw_train, raw_heldout, instruct_train, instruct_heldout, longtail, tuple(t for t, _ in tail))


def corpus_text_for_tokenizer(seed: int = 0) -> list[str]:
    """Text to train the presets' BPE tokenizer on: mostly general text, some of each built-in domain.

    The domain share is kept small on purpose: like a real general-purpose tokenizer, it should know
    everyday words well and split rare professional terms into several pieces, which is what the
    term-embedding extension then fixes.
    """
    general = generate_corpus(general_pack(), seed=seed, n_raw=3000, n_instruct=1000, heldout_fraction=0.0, n_longtail=0)
    texts = list(general.raw_train) + [f"{p['prompt']}\n{p['response']}" for p in general.instruct_train]
    for name in BUILTIN_DOMAINS:
        domain = generate_corpus(builtin_pack(name), seed=seed, n_raw=300, n_instruct=100, heldout_fraction=0.0, n_longtail=0)
        texts += list(domain.raw_train) + [f"{p['prompt']}\n{p['response']}" for p in domain.instruct_train]
    return texts
