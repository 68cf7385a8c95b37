"""The histogram of a counter's counts: how many distinct states were seen
once, twice, ... -- all that every Rényi entropy needs.

After a run of mostly distinct states this is a pass over millions of counts
that are nearly all 1, so it is tallied in one pass into a small table (four
interleaved copies of it: consecutive equal counts do not wait on one
another's increment); the rare counts beyond the table are sorted apart.
"""

from __future__ import annotations

import numpy as np

from ..errors import OptionError
from .jit import kernel

__all__ = ["histogram_of_counts"]

_TABLE = 1024  # counts below this are tallied in the table, larger ones sorted
_COPIES = 4
_INT64_MAX = np.iinfo(np.int64).max


@kernel
def _tally(counts, tables):
    """Add each count below ``tables.shape[1]`` to ``tables`` (count ``i`` of a
    group of four to copy ``i``); return how many counts were left out."""
    width = tables.shape[1]
    copies = tables.shape[0]
    left_out = 0
    whole = counts.size - counts.size % copies
    for start in range(0, whole, copies):
        for k in range(copies):
            c = counts[start + k]
            if 0 <= c < width:
                tables[k, c] += 1
            else:
                left_out += 1
    for i in range(whole, counts.size):
        c = counts[i]
        if 0 <= c < width:
            tables[0, c] += 1
        else:
            left_out += 1
    return left_out


def histogram_of_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(values, multiplicities)``, both int64, of non-negative integer counts:
    ``multiplicities[i]`` counts equal ``values[i]`` (values ascending, zeros left out)."""
    counts = np.asarray(counts).ravel()
    if counts.dtype.kind not in "ui":
        raise OptionError(f"a histogram of counts needs integer counts, got an array of {counts.dtype}")
    if counts.dtype == np.uint64 and counts.size and int(counts.max()) > _INT64_MAX:
        raise OptionError(f"counts must be below 2**63, got {int(counts.max())}")
    counts = counts.astype(np.int64, copy=False)
    tables = np.zeros((_COPIES, _TABLE), np.int64)
    left_out = _tally(counts, tables)
    tally = tables.sum(axis=0)
    values = np.flatnonzero(tally[1:]) + 1
    multiplicities = tally[values]
    if left_out:
        if int(counts.min()) < 0:
            raise OptionError(f"counts must not be negative, got {int(counts.min())}")
        large, seen = np.unique(counts[counts >= _TABLE], return_counts=True)
        values, multiplicities = np.concatenate([values, large]), np.concatenate([multiplicities, seen])
    return values.astype(np.int64, copy=False), multiplicities.astype(np.int64, copy=False)
