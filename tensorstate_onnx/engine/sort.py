"""Sorts the counter needs: uint64 keys (an LSD radix sort above a few
thousand keys) and the lexicographic order of rows of words."""

from __future__ import annotations

import numpy as np

from .jit import kernel

__all__ = ["RADIX_MIN", "lex_order", "sort_keys"]

_RADIX_BITS = 11  # digit width of the radix sort: 2,048 counters stay in L1
RADIX_MIN = 4096  # below this many keys numpy's sort is as fast


@kernel
def _radix_sort_kernel(keys, low_bit, scratch):
    """Stable LSD radix sort of ``keys`` by bits ``[low_bit, 64)``; digits in
    which no two keys differ are skipped (short states leave their low bytes
    zero, tags their index bits). ``scratch`` holds at least as many uint64."""
    n = keys.size
    buckets = 1 << _RADIX_BITS
    mask = np.uint64(buckets - 1)
    varying = np.uint64(0)
    for i in range(n):
        varying |= keys[i] ^ keys[0]
    src = keys
    dst = scratch[:n]
    count = np.empty(buckets, np.int64)
    for shift in range(low_bit, 64, _RADIX_BITS):
        s = np.uint64(shift)
        if not (varying >> s) & mask:
            continue
        count[:] = 0
        for i in range(n):
            count[(src[i] >> s) & mask] += 1
        total = 0
        for d in range(buckets):
            c = count[d]
            count[d] = total
            total += c
        for i in range(n):
            v = src[i]
            d = (v >> s) & mask
            dst[count[d]] = v
            count[d] += 1
        src, dst = dst, src
    if src is not keys:
        keys[:] = src


def sort_keys(keys: np.ndarray, low_bit: int = 0, scratch: np.ndarray | None = None) -> None:
    """Sort uint64 ``keys`` in place; keys equal in bits ``[low_bit, 64)`` must
    already be in order among themselves (their order is kept). ``scratch``:
    room for ``keys.size`` uint64 to sort through (allocated when None)."""
    if keys.size < RADIX_MIN:
        keys.sort()
    else:
        _radix_sort_kernel(keys, low_bit, np.empty(keys.size, np.uint64) if scratch is None else scratch)


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
