"""What is allocated at a GPU run's peak: torch's allocator history (``torch.cuda.memory._record_memory_history``)
replayed to its highest point, the blocks alive there grouped by the line of code that allocated them.

The planner (:mod:`dsft.eval.plan`) computes memory from shapes; this measures where a real step's peak goes, to
find what to shrink. Record, run, then::

    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    baseline = torch.cuda.memory_allocated()        # what was allocated before the history starts (the weights)
    ...                                              # the steps
    report = at_peak(torch.cuda.memory._snapshot()["device_traces"][0], baseline)
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TORCH_INTERNALS = ("/torch/", "/contextlib.py", "/functools.py", "<frozen")
"""Frames skipped when naming where a block came from: the allocation's first frame outside them is the caller."""


@dataclass(frozen=True)
class PeakReport:
    peak_bytes: int
    """Allocated bytes at the highest point of the history (``baseline`` included)."""
    baseline_bytes: int
    """Allocated before the history started: alive at the peak too, with no frames to name them."""
    top: list[tuple[str, int, int]]
    """``(where, bytes, blocks)`` alive at the peak, most bytes first."""

    def to_json(self, gib: float = 2**30) -> dict[str, Any]:
        return {"peak_gib": round(self.peak_bytes / gib, 3), "baseline_gib": round(self.baseline_bytes / gib, 3),
                "top": [{"where": w, "gib": round(b / gib, 3), "blocks": n} for w, b, n in self.top]}


def allocated_by(frames: Sequence[Mapping[str, Any]]) -> str:
    """``dir/dir/file:line function`` of the innermost frame outside torch's own code (the innermost frame if all
    are)."""
    chosen = next((f for f in frames if not any(t in f.get("filename", "") for t in TORCH_INTERNALS)),
                  frames[0] if frames else None)
    if chosen is None:
        return "(no frames)"
    path = "/".join(chosen.get("filename", "?").split("/")[-3:])  # enough of the path to find the file
    return f"{path}:{chosen.get('line', '?')} {chosen.get('name', '?')}"


def at_peak(events: Iterable[Mapping[str, Any]], baseline: int = 0, top: int = 20) -> PeakReport:
    """Replay ``events`` (one device's trace of a memory snapshot: ``alloc`` adds a block, ``free_completed``
    removes it; other actions change nothing allocated) from ``baseline`` bytes; return the peak and the blocks alive
    there, grouped by :func:`allocated_by`. A block freed that was allocated before the history began lowers the
    total without being listed (it was part of ``baseline``)."""
    events = list(events)
    current = peak = baseline
    peak_at = -1
    for i, ev in enumerate(events):
        if ev["action"] == "alloc":
            current += ev["size"]
            if current > peak:
                peak, peak_at = current, i
        elif ev["action"] == "free_completed":
            current -= ev["size"]
    live: dict[int, tuple[int, str]] = {}
    for ev in events[: peak_at + 1]:
        if ev["action"] == "alloc":
            live[ev["addr"]] = (ev["size"], allocated_by(ev.get("frames", ())))
        elif ev["action"] == "free_completed":
            live.pop(ev["addr"], None)
    groups: dict[str, list[int]] = {}
    for size, where in live.values():
        g = groups.setdefault(where, [0, 0])
        g[0] += size
        g[1] += 1
    ranked = sorted(((w, b, n) for w, (b, n) in groups.items()), key=lambda r: -r[1])
    return PeakReport(peak, baseline, ranked[:top])
