"""Several adapters' terms on one base: each adapter's tokens in their own global id range, and each row
of a batch seeing exactly the vocabulary it would see with only its adapter attached."""
from __future__ import annotations

import torch
from torch import nn

from dsft.adapters.terms import MultiTermEmbedding, MultiTermHead, TermEmbedding, TermHead, TermTable

D, V = 8, 20


def _rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randn(n, D, generator=g)


def test_ranges_are_disjoint_first_fit_and_freed_on_remove():
    table = TermTable(first_id=V)
    a = table.add("a", V, *_rows(3, 0))
    b = table.add("b", V, *_rows(5, 1))
    assert (a.start, a.end, b.start, b.end) == (V, V + 3, V + 3, V + 8)
    table.remove("a")
    c = table.add("c", V, *_rows(2, 2))  # reuses the gap
    assert (c.start, c.end) == (V, V + 2) and table.end == V + 8
    d = table.add("d", V, *_rows(4, 3))  # does not fit the gap left before b
    assert d.start == V + 8
    assert table.nbytes("b") == 2 * 5 * D * 4


def test_each_row_matches_the_single_adapter_term_layers():
    torch.manual_seed(0)
    embed, head = nn.Embedding(V, D), nn.Linear(D, V, bias=False)
    table = TermTable(first_id=V)
    rows = {"a": _rows(3, 0), "b": _rows(4, 1)}
    for key, (e, h) in rows.items():
        table.add(key, V, e, h)
    m_embed, m_head = MultiTermEmbedding(embed, table), MultiTermHead(head, table)
    local = torch.tensor([[1, V, V + 2, 5], [V + 3, 2, V, 7]])  # row 0 uses a, row 1 uses b
    keys = ["a", "b"]
    global_ids = torch.stack([torch.tensor(table.to_global(local[i].tolist(), k)) for i, k in enumerate(keys)])
    assert global_ids[1, 0] == table.range_of("b").start + 3
    h = m_embed(global_ids)
    index = table.local_index(keys, V, "cpu")
    logits = table.local_logits(m_head(h).reshape(-1, table.end), index.repeat_interleave(4, 0)).view(2, 4, -1)
    for i, key in enumerate(keys):
        single_e, single_h = TermEmbedding(embed, V, rows[key][0]), TermHead(head, V, rows[key][1])
        torch.testing.assert_close(h[i], single_e(local[i]))
        want = single_h(h[i])
        torch.testing.assert_close(logits[i, :, : want.shape[-1]], want)
        assert torch.isinf(logits[i, :, want.shape[-1]:]).all()  # ids another adapter owns are out of reach


def test_a_row_without_adapter_sees_the_base_vocabulary():
    head = nn.Linear(D, V, bias=False)
    table = TermTable(first_id=V)
    table.add("a", V, *_rows(3, 0))
    h = torch.randn(2, D)
    index = table.local_index([None, "a"], V, "cpu")
    logits = table.local_logits(MultiTermHead(head, table)(h), index)
    torch.testing.assert_close(logits[0, :V], head(h)[0])
    assert torch.isinf(logits[0, V:]).all()
    ids = torch.tensor([3, V - 1])
    assert torch.equal(TermTable.to_global_tensor(ids, table.shifts([None, "a"], "cpu")), ids)
