"""The examples' lengths in packed rows, as variable-length attention takes them (:mod:`dsft.kernels.varlen`):
per row on the host, then the offsets on the device with every empty slot at the end."""
from __future__ import annotations

import pytest
import torch

from dsft.data.packing import MIN_SLOTS, cu_seqlens, pack_rows, row_lengths, slots_needed


def _packed(layout: list[list[int]], seq: int, vocab: int = 400) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    examples = {n: torch.randint(3, vocab, (n,), generator=g) for row in layout for n in row}
    return pack_rows(lambda n: (examples[n], examples[n].clone()), layout, seq, pad_id=0)


def test_row_lengths_are_each_rows_examples_then_its_padding():
    batch = _packed([[5, 9], [16], [7, 3, 4]], 16)
    lengths = row_lengths(batch["position_ids"])
    assert lengths.shape == (3, MIN_SLOTS) and lengths.dtype == torch.int32
    assert lengths[:, :4].tolist() == [[5, 9, 2, 0], [16, 0, 0, 0], [7, 3, 4, 2]]
    assert int(lengths.sum()) == 3 * 16
    assert slots_needed(batch["position_ids"]) == MIN_SLOTS
    with pytest.raises(ValueError, match="holds 4 examples, more than slots=2"):
        row_lengths(batch["position_ids"], slots=2)


def test_slots_round_up_to_a_power_of_two_over_the_whole_data():
    many = _packed([[1] * 20 + [4]], 24)  # 21 examples, and 3 tokens of padding: 22
    assert slots_needed(many["position_ids"]) == 32
    assert row_lengths(many["position_ids"]).shape == (1, 32)


def test_offsets_put_every_empty_slot_after_the_examples():
    lengths = torch.tensor([[5, 9, 2, 0], [16, 0, 0, 0], [7, 3, 4, 2]], dtype=torch.int32)
    cu = cu_seqlens(lengths)
    assert cu.dtype == torch.int32 and cu.shape == (13,)
    assert cu.tolist() == [0, 5, 14, 16, 32, 39, 42, 46, 48, 48, 48, 48, 48]
