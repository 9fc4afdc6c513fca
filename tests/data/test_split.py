"""The held-out split of a user's records: deterministic, by content, and never overlapping training."""
from __future__ import annotations

import random

import pytest

from dsft.data.files import Record
from dsft.data.split import heldout_count, overlap, record_key, split_heldout


def _records(n: int) -> list[Record]:
    return [Record.raw(f"document {i} about a clause", source=f"a.jsonl:{i + 1}") for i in range(n)]


def test_same_records_in_any_order_give_the_same_split():
    records = _records(300)
    shuffled = records[:]
    random.Random(1).shuffle(shuffled)
    a, b = split_heldout(records), split_heldout(shuffled)
    assert [r.text for r in a.heldout] == [r.text for r in b.heldout]
    assert sorted(r.text for r in a.train) == sorted(r.text for r in b.train)
    assert len(a.heldout) + len(a.train) == 300


def test_held_out_and_train_never_share_a_record_even_with_duplicates():
    records = _records(200)
    records += records[:100]  # every one of the first hundred twice
    split = split_heldout(records)
    assert overlap(split.heldout, split.train) == 0
    assert len({record_key(r) for r in split.heldout}) == len(split.heldout)  # a duplicate is held out once


def test_the_key_is_the_content_not_where_it_came_from():
    assert record_key(Record.raw("x", source="a:1")) == record_key(Record.raw("x", source="b:9"))
    assert record_key(Record.raw("x")) != record_key(Record.instruction("x", ""))


@pytest.mark.parametrize("n, expected", [(0, 0), (1, 0), (4, 1), (100, 20), (485, 50), (10_000, 200)])
def test_two_percent_with_at_least_fifty_where_there_are_enough(n, expected):
    assert heldout_count(n) == expected


def test_overlap_counts_held_out_records_seen_in_training():
    records = _records(10)
    assert overlap(records[:3] + [Record.raw("new")], records) == 3
