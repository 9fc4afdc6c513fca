"""Which adapter each row of a batch uses, and the factors of the adapters present stacked along the rank.

:class:`RowGroups` maps rows to adapters and builds the column masks that keep, for each row, only its own
adapter's rank block of the stacked factors (:func:`stack_linear`, :func:`stack_experts`); see
:mod:`dsft.runtime.multilora` for the forwards that use them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from dsft.kernels.expert_lora import LowRank
from dsft.runtime.weights import LinearLora


@dataclass(eq=False)
class RowGroups:
    """Which adapter each row of the current batch uses.

    ``keys`` are the adapters present (sorted); ``row_group[i]`` is row i's index into ``keys``, or -1 for
    a row on the plain base. Column masks for stacked factors are cached per layout.
    """

    batch: int
    keys: tuple[str, ...]
    row_group: torch.Tensor
    uniform: str | None
    """The adapter every row uses, when they all use the same one."""
    _masks: dict = field(default_factory=dict, repr=False)
    _cols: dict = field(default_factory=dict, repr=False)
    """Per (groups, ranks): each stacked rank column's group (no row data: kept by :meth:`drop_masks`)."""

    @classmethod
    def of(cls, keys: Sequence[str | None], device) -> RowGroups:
        present = tuple(sorted({k for k in keys if k is not None}))
        index = {k: i for i, k in enumerate(present)}
        row_group = torch.tensor([index.get(k, -1) if k is not None else -1 for k in keys], device=device)
        uniform = keys[0] if keys and keys[0] is not None and all(k == keys[0] for k in keys) else None
        return cls(len(keys), present, row_group, uniform)

    def column_mask(self, groups: tuple[int, ...], ranks: tuple[int, ...], n: int, dtype) -> torch.Tensor:
        """``[n, sum(ranks)]`` for ``n`` flattened positions (``n // batch`` per row, in row order): 1 where the
        position's adapter owns the rank column, else 0. Computed on the device from :attr:`row_group`
        without a host sync (a CUDA graph recomputes it at every replay, see :meth:`drop_masks`)."""
        key = (groups, ranks, n, dtype)
        mask = self._masks.get(key)
        if mask is None:
            cols = self._cols.get((groups, ranks))
            if cols is None:
                cols = self._cols[(groups, ranks)] = torch.tensor(
                    [g for g, r in zip(groups, ranks) for _ in range(r)], device=self.row_group.device)
            mask = (self.row_group[:, None] == cols[None, :]).to(dtype)
            if n != self.batch:
                mask = mask[:, None, :].expand(self.batch, n // self.batch, mask.shape[1]).reshape(n, mask.shape[1])
            self._masks[key] = mask
        return mask

    def positions_group(self, n: int) -> torch.Tensor:
        """Each of ``n`` flattened positions' group (``n // batch`` per row, in row order)."""
        if n == self.batch:
            return self.row_group
        return self.row_group[:, None].expand(self.batch, n // self.batch).reshape(n)

    def drop_masks(self) -> None:
        """Forget the computed masks (not the column layouts, which hold no row data), so the next forward
        computes them again from :attr:`row_group`: what a CUDA graph captured after a warm-up needs."""
        self._masks = {}


def stack_linear(factors: Sequence[LinearLora]) -> LinearLora:
    """Several adapters' factors of one module as one: A stacked along the rank, B likewise."""
    if len(factors) == 1:
        return factors[0]
    return LinearLora(torch.cat([f.A for f in factors], 0), torch.cat([f.B for f in factors], 1))


def stack_experts(factors: Sequence[LowRank]) -> LowRank:
    """Several adapters' expert factors as one: A [E, sum r, in], B [E, out, sum r] (scales folded into B)."""
    if len(factors) == 1 and factors[0].scale == 1.0:
        return factors[0]
    return LowRank(torch.cat([f.A for f in factors], 1), torch.cat([f.B * f.scale for f in factors], 2), 1.0)
