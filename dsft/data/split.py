"""A deterministic held-out split of the user's records, and the overlap check for a given held-out file.

Records are assigned by a hash of their content (never their position or file name), so the same data
gives the same split whatever order the files are listed in, and copies of one record always land on
the same side: a held-out record can never also train.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from dsft.data.files import Record

HELDOUT_FRACTION = 0.02
HELDOUT_MINIMUM = 50
"""At least this many held-out records where there are enough: 2% of a few hundred records is too few
to measure a loss difference on (issue 21.2)."""
MAX_MINIMUM_SHARE = 0.2
"""The minimum never takes more than this share of the data: a small file keeps most of it for training."""


def record_key(record: Record) -> str:
    """The sha256 of a record's content (kind and fields; not its source), the identity used by the split."""
    messages = [[m.role, m.content] for m in record.messages] if record.messages else None
    body = json.dumps([record.kind, record.text, record.prompt, record.response, messages], ensure_ascii=False)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def heldout_count(n: int, fraction: float = HELDOUT_FRACTION, minimum: int = HELDOUT_MINIMUM) -> int:
    """How many of ``n`` distinct records to hold out: ``fraction`` of them, at least ``minimum`` where
    that is at most a fifth of the data, and always leaving at least one to train on.

    Raises:
        ValueError: ``fraction`` outside [0, 1) or a negative ``minimum``.
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    if minimum < 0:
        raise ValueError(f"held-out minimum must be >= 0, got {minimum}")
    if n < 2 or fraction == 0 and minimum == 0:
        return 0
    k = max(math.ceil(fraction * n), min(minimum, int(MAX_MINIMUM_SHARE * n)))
    return min(k, n - 1)


@dataclass(frozen=True)
class Split:
    """The records that train and the records held out; no content is in both."""

    train: tuple[Record, ...]
    heldout: tuple[Record, ...]


def split_heldout(records: Sequence[Record], fraction: float = HELDOUT_FRACTION, minimum: int = HELDOUT_MINIMUM) -> Split:
    """Hold out the records whose content hashes are smallest, :func:`heldout_count` distinct contents.

    A held-out content is kept once (duplicates would count it twice in the loss); every copy of it
    leaves the training side. Training records keep their order.

    Args:
        records: the user's records, in any order.
        fraction, minimum: see :func:`heldout_count`.

    Returns:
        Split; the same records (in any order) give the same split.
    """
    keys = [record_key(r) for r in records]
    distinct = sorted(set(keys))
    held = set(distinct[: heldout_count(len(distinct), fraction, minimum)])
    heldout: dict[str, Record] = {}
    train = []
    for key, record in zip(keys, records):
        if key in held:
            heldout.setdefault(key, record)
        else:
            train.append(record)
    return Split(tuple(train), tuple(heldout[k] for k in sorted(heldout)))


def overlap(heldout: Sequence[Record], train: Sequence[Record]) -> int:
    """How many held-out records have the content of a training record (a measure of memorisation, not of
    the domain: worth a warning with this count)."""
    seen = {record_key(r) for r in train}
    return sum(record_key(r) in seen for r in heldout)
