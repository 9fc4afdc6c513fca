"""Streamed text: pieces decoded from a window of the last ids add up to the whole sequence's decode."""
from __future__ import annotations

import random

import pytest

from dsft.runtime.generation import TextStream


@pytest.fixture(scope="module", params=["tiny-deepseek-v2", "tiny-qwen3-moe", "tiny-mixtral"])
def tokenizer(request):
    from dsft.base import load_base

    return load_base(request.param, device="cpu").tokenizer


def _ids(tokenizer, seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    text = "Duration risk: 3.5% — the bond's yield 収益率 rose, naïve café ✓ " * 3
    real = tokenizer.encode(text, add_special_tokens=False)
    # Real text, then random ids (which may split characters across tokens or never finish one).
    return real[: n // 2] + [rng.randrange(len(tokenizer)) for _ in range(n - n // 2)]


@pytest.mark.parametrize("seed", range(6))
def test_pieces_add_up_to_the_decode_of_every_id(tokenizer, seed):
    ids = _ids(tokenizer, seed, 120)
    stream = TextStream(tokenizer, live=True)
    pieces = [stream.push(t) for t in ids]
    pieces.append(stream.flush())
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert stream.windowed and "".join(pieces) == stream.text
    # The whole decode, but for a last character still incomplete when the ids end.
    assert whole.startswith(stream.text) and len(whole) - len(stream.text) <= 1


def test_stop_strings_cut_the_windowed_text_where_the_whole_text_would_be_cut(tokenizer):
    ids = tokenizer.encode("The bond's yield rose and the desk sold. Then the court ruled.", add_special_tokens=False)
    stream = TextStream(tokenizer, stop=["sold."], live=True)
    out = ""
    for t in ids:
        out += stream.push(t)
        if stream.stopped:
            break
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert stream.stopped and out == stream.text == whole[: whole.index("sold.")]
