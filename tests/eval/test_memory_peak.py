"""Where a GPU run's peak memory goes, from the allocator's history (replayed here on a synthetic trace: the
history itself is CUDA-only)."""
from __future__ import annotations

from dsft.eval.memory_peak import allocated_by, at_peak

TORCH = {"filename": "/site-packages/torch/nn/functional.py", "line": 10, "name": "linear"}


def _frame(file: str, line: int, name: str) -> dict:
    return {"filename": f"/work/dsft/{file}", "line": line, "name": name}


def test_the_blocks_alive_at_the_highest_point_grouped_by_the_code_that_allocated_them():
    attn, moe, loss = _frame("kernels/attn.py", 5, "fwd"), _frame("kernels/moe.py", 9, "experts"), _frame("eval/losses.py", 3, "ce")
    events = [
        {"action": "alloc", "addr": 1, "size": 100, "frames": [TORCH, attn]},
        {"action": "alloc", "addr": 2, "size": 300, "frames": [moe]},
        {"action": "alloc", "addr": 3, "size": 50, "frames": [moe]},
        {"action": "free_requested", "addr": 1, "size": 100},  # stream-ordered: still allocated until completed
        {"action": "alloc", "addr": 4, "size": 500, "frames": [loss]},  # the peak: 1000 + 950
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 4, "size": 500},
        {"action": "alloc", "addr": 5, "size": 400, "frames": [attn]},  # 1000 + 750: lower
        {"action": "free_completed", "addr": 99, "size": 1000},  # a block from before the history (the baseline's)
    ]
    report = at_peak(events, baseline=1000)
    assert report.peak_bytes == 1950 and report.baseline_bytes == 1000
    assert report.top == [("dsft/eval/losses.py:3 ce", 500, 1), ("dsft/kernels/moe.py:9 experts", 350, 2),
                          ("dsft/kernels/attn.py:5 fwd", 100, 1)]  # the torch frame skipped for its caller
    assert report.to_json(gib=1)["top"][0] == {"where": "dsft/eval/losses.py:3 ce", "gib": 500, "blocks": 1}


def test_a_history_that_never_rises_above_its_baseline_lists_nothing():
    report = at_peak([{"action": "free_completed", "addr": 7, "size": 10}], baseline=64)
    assert report.peak_bytes == 64 and report.top == []
    assert allocated_by([TORCH]) == "torch/nn/functional.py:10 linear"  # only torch's own frames: the innermost
    assert allocated_by([]) == "(no frames)"
