"""The lexicographic order of rows of words, which the counter needs for
``result(sort=True)`` of long states.

Only ``result(sort=True)`` needs it, once, so its column keys are ordered
with numpy's argsort; the sorts on the counting path, a batch at a time, are
:func:`.radix.sort_keys`.
"""

from __future__ import annotations

import numpy as np

from .jit import kernel

__all__ = ["lex_order"]


# Groups of rows equal in one column that are sorted by the next column with
# numpy (larger) or by a merge sort over the remaining columns (smaller).
_LEX_GROUP = 4096


@kernel
def _sort_groups(big, order, starts, ends, col):
    """Sort each ``order[starts[g]:ends[g]]`` by the columns from ``col`` on."""
    n_cols = big.shape[1]
    for g in range(starts.size):
        lo = starts[g]
        hi = ends[g]
        n = hi - lo
        src = order[lo:hi].copy()
        buf = np.empty(n, np.int64)
        width = 1
        while width < n:
            for a in range(0, n, 2 * width):
                mid = min(a + width, n)
                b_hi = min(a + 2 * width, n)
                i, j, k = a, mid, a
                while i < mid and j < b_hi:
                    less = False
                    for c in range(col, n_cols):
                        x = big[src[j], c]
                        y = big[src[i], c]
                        if x != y:
                            less = x < y
                            break
                    if less:
                        buf[k] = src[j]
                        j += 1
                    else:
                        buf[k] = src[i]
                        i += 1
                    k += 1
                while i < mid:
                    buf[k] = src[i]
                    i += 1
                    k += 1
                while j < b_hi:
                    buf[k] = src[j]
                    j += 1
                    k += 1
            src, buf = buf, src
            width *= 2
        order[lo:hi] = src


def lex_order(big: np.ndarray, col: int = 0, rows: np.ndarray | None = None) -> np.ndarray:
    """Order of the distinct rows of ``big`` (uint64 (k, n_cols)) by column ``col``,
    then the next columns (most significant digit first, one column at a time)."""
    keys = big[:, col] if rows is None else big[rows, col]
    local = np.argsort(keys)
    order = local if rows is None else rows[local]
    if col + 1 == big.shape[1] or order.size < 2:
        return order
    sorted_keys = keys[local]
    bounds = np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [order.size]))
    sizes = ends - starts
    large = sizes > _LEX_GROUP
    small = (sizes > 1) & ~large
    if small.any():
        _sort_groups(big, order, starts[small], ends[small], col + 1)
    for lo, hi in zip(starts[large], ends[large]):
        order[lo:hi] = lex_order(big, col + 1, order[lo:hi])
    return order
