"""Runs: distinct states with their counts, sorted by key, and the kernels
that search, count into, merge and compact them (with the arena that holds
the words of states longer than 8 bytes)."""

from __future__ import annotations

import numpy as np

from .arrays import trimmed
from .choice import pick
from .hashing import cmp_words
from .jit import kernel

__all__ = [
    "UNIT", "Run", "absorb_kernel", "close_gaps", "count_known", "count_sorted_keys", "gallop", "keep_rows",
    "merge_many", "merge_runs",
]


@kernel(inline="always")
def gallop(h, i, v):
    """The first index ``>= i`` of sorted ``h`` whose key is ``>= v`` (``h.size``
    if none): steps of 1, 2, 4, ... then a binary search, so the cost grows
    with the log of the distance, and a key next in line costs one compare."""
    n = h.size
    if i >= n or h[i] >= v:
        return i
    lo = i  # h[lo] < v <= h[hi] (h[n] counts as infinite)
    hi = lo + 1
    step = 1
    while hi < n and h[hi] < v:
        lo = hi
        step *= 2
        hi = lo + step
    if hi > n:
        hi = n
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if h[mid] < v:
            lo = mid
        else:
            hi = mid
    return hi


@kernel
def count_known(sorted_keys, h):
    """How many of ``sorted_keys`` occur in the sorted keys ``h`` of a run."""
    i = 0
    found = 0
    for v in sorted_keys:
        i = gallop(h, i, v)
        if i < h.size and h[i] == v:
            found += 1
    return found


@kernel
def count_sorted_keys(keys, weights, h1, c1, keys_out, counts_out):
    """Count sorted ``keys`` (states as their own keys), each seen ``weights``
    times (empty: once), into the run ``(h1, c1)``: the count of a state the
    run holds is added to ``c1`` in place; the other distinct states go to
    ``keys_out`` (which may be ``keys`` itself) with their counts in
    ``counts_out``. Returns ``(how many were written, distinct keys)``.

    The run is searched by galloping from the last match (:func:`gallop`).
    """
    weighted = weights.size > 0
    n = keys.size
    n1 = h1.size
    i = 0
    m = 0
    distinct = 0
    j = 0
    while j < n:
        v = keys[j]
        distinct += 1
        count = 0
        e = j
        while e < n and keys[e] == v:
            count += weights[e] if weighted else 1
            e += 1
        i = gallop(h1, i, v)
        if i < n1 and h1[i] == v:
            c1[i] += count
        else:
            keys_out[m] = v
            counts_out[m] = count
            m += 1
        j = e
    return m, distinct


@kernel
def keep_rows(src, rows, dst, base, refs_out):
    """Copy the chosen rows of ``src`` (one per distinct state) to ``dst`` from
    row ``base`` on, in their order in ``src`` (a streaming copy);
    ``refs_out[j]``: where ``rows[j]`` went. ``src`` may be ``dst[base:]``."""
    n = src.shape[0]
    n_words = src.shape[1]
    if rows.size == n:
        # Every row is kept: a straight copy.
        if src.ctypes.data != dst[base:].ctypes.data:
            for i in range(n):
                for w in range(n_words):
                    dst[base + i, w] = src[i, w]
        for j in range(rows.size):
            refs_out[j] = base + rows[j]
        return
    new_place = np.full(n, -1, np.int64)
    for j in range(rows.size):
        new_place[rows[j]] = 0
    p = 0
    for i in range(n):
        if new_place[i] == 0:
            new_place[i] = p
            for w in range(n_words):
                dst[base + p, w] = src[i, w]
            p += 1
    for j in range(rows.size):
        refs_out[j] = base + new_place[rows[j]]


@kernel
def _merge_keys(h1, c1, h2, c2, h_out, c_out):
    """Merge two runs whose keys are the states (sorted, distinct), adding the
    counts of equal keys. Branch-free: the interleaving of random runs would
    defeat the branch predictor (see :mod:`.choice`). Each run's next key is
    read before the compare that decides which run moves on, so a step waits
    for a compare and a conditional move, not for a load (1.5x on random runs).
    """
    n1 = h1.size
    n2 = h2.size
    i = 0
    j = 0
    m = 0
    none = np.int64(0)
    if n1 > 1 and n2 > 1:
        x = h1[0]
        y = h2[0]
        while i < n1 - 1 and j < n2 - 1:
            next_x = h1[i + 1]
            next_y = h2[j + 1]
            take1 = x <= y
            take2 = y <= x
            h_out[m] = pick(take1, x, y)
            c_out[m] = pick(take1, c1[i], none) + pick(take2, c2[j], none)
            x = pick(take1, next_x, x)
            y = pick(take2, next_y, y)
            i += np.int64(take1)
            j += np.int64(take2)
            m += 1
    while i < n1 and j < n2:  # up to the last key of a run
        x = h1[i]
        y = h2[j]
        take1 = x <= y
        take2 = y <= x
        h_out[m] = pick(take1, x, y)
        c_out[m] = pick(take1, c1[i], none) + pick(take2, c2[j], none)
        i += np.int64(take1)
        j += np.int64(take2)
        m += 1
    while i < n1:
        h_out[m] = h1[i]
        c_out[m] = c1[i]
        i += 1
        m += 1
    while j < n2:
        h_out[m] = h2[j]
        c_out[m] = c2[j]
        j += 1
        m += 1
    return m


@kernel
def _merge_refs(h1, r1, c1, h2, r2, c2, arena, h_out, r_out, c_out):
    """Merge two runs sorted by (hash, words), adding the counts of equal states.

    A run holds hashes, references to arena rows and counts; only those move.
    Unequal hashes (the common case) are merged without a data-dependent
    branch, each run's next hash read ahead as in :func:`_merge_keys`; equal
    hashes compare the arena rows. The indices are unsigned: numba then
    leaves out the wrap-around of negative indices, which here kept the
    reads ahead from paying (1.6x with them, on random runs).
    """
    one = np.uint64(1)
    n1 = np.uint64(h1.size)
    n2 = np.uint64(h2.size)
    i = np.uint64(0)
    j = np.uint64(0)
    m = np.uint64(0)
    if n1 > one and n2 > one:
        x = h1[i]
        y = h2[j]
        while i < n1 - one and j < n2 - one:
            next_x = h1[i + one]
            next_y = h2[j + one]
            if x != y:
                take1 = x < y
                take2 = not take1
                h_out[m] = pick(take1, x, y)
                r_out[m] = pick(take1, r1[i], r2[j])
                c_out[m] = pick(take1, c1[i], c2[j])
                x = pick(take1, next_x, x)
                y = pick(take2, next_y, y)
                i += np.uint64(take1)
                j += np.uint64(take2)
                m += one
            else:
                m, i, j = _merge_equal_hashes(r1, c1, r2, c2, arena, i, j, x, h_out, r_out, c_out, m)
                x = h1[i]  # rare: read again
                y = h2[j]
    while i < n1 and j < n2:  # up to the last entry of a run
        x = h1[i]
        y = h2[j]
        if x != y:
            take1 = x < y
            h_out[m] = pick(take1, x, y)
            r_out[m] = pick(take1, r1[i], r2[j])
            c_out[m] = pick(take1, c1[i], c2[j])
            i += np.uint64(take1)
            j += np.uint64(not take1)
            m += one
        else:
            m, i, j = _merge_equal_hashes(r1, c1, r2, c2, arena, i, j, x, h_out, r_out, c_out, m)
    while i < n1:
        h_out[m] = h1[i]
        r_out[m] = r1[i]
        c_out[m] = c1[i]
        i += one
        m += one
    while j < n2:
        h_out[m] = h2[j]
        r_out[m] = r2[j]
        c_out[m] = c2[j]
        j += one
        m += one
    return np.int64(m)


@kernel(inline="always")
def _merge_equal_hashes(r1, c1, r2, c2, arena, i, j, h, h_out, r_out, c_out, m):
    """The step of :func:`_merge_refs` where both runs' next entries have hash
    ``h``: the state with the smaller words goes out, with both counts if the
    states are equal. Returns the new ``(m, i, j)``."""
    one = np.uint64(1)
    order = cmp_words(arena, r1[i], arena, r2[j])
    h_out[m] = h
    if order <= 0:
        r_out[m] = r1[i]
        c_out[m] = c1[i]
        if order == 0:
            c_out[m] += c2[j]
            j += one
        i += one
    else:
        r_out[m] = r2[j]
        c_out[m] = c2[j]
        j += one
    return m + one, i, j


@kernel
def absorb_kernel(h1, r1, c1, h2, r2, c2, arena, h_out, r_out, c_out):
    """Add to ``c1`` the counts of the states of run 2 that run 1 holds; write
    the other states of run 2 to the outputs and return how many.

    Runs are sorted by (hash, words); states of equal hashes are told apart by
    their arena rows. The outputs may be run 2 itself. Run 1 is searched by
    galloping (:func:`gallop`), so a run of new states costs a step or two
    per state.
    """
    n1 = h1.size
    i = 0
    m = 0
    for j in range(h2.size):
        y = h2[j]
        i = gallop(h1, i, y)
        k = i
        found = False
        while k < n1 and h1[k] == y:
            order = cmp_words(arena, r1[k], arena, r2[j])
            if order == 0:
                c1[k] += c2[j]
                found = True
                break
            if order > 0:
                break
            k += 1
        if not found:
            h_out[m] = y
            r_out[m] = r2[j]
            c_out[m] = c2[j]
            m += 1
    return m


@kernel
def close_gaps(arena, start, k, refs):
    """Move the rows of ``arena[start : start + k]`` that ``refs`` refer to
    down to the front of that range, in order, and point ``refs`` at their new
    places; returns how many rows stay."""
    place = np.full(k, -1, np.int64)
    for r in refs:
        place[r - start] = 0
    p = 0
    for i in range(k):
        if place[i] == 0:
            place[i] = p
            if p != i:
                arena[start + p, :] = arena[start + i, :]
            p += 1
    for j in range(refs.size):
        refs[j] = start + place[refs[j] - start]
    return p


UNIT = np.empty(0, np.int64)  # weights meaning "each row once"


class Run:
    """Distinct states with counts, sorted by key (then by the state's words).

    ``keys`` (uint64 (k,)) is the state itself for states of up to 8 bytes
    (``refs`` is None), else a hash of the state, whose words are in row
    ``refs[i]`` (int64) of the counter's arena.
    """

    __slots__ = ("keys", "refs", "counts")

    def __init__(self, keys: np.ndarray, refs: np.ndarray | None, counts: np.ndarray):
        self.keys, self.refs, self.counts = keys, refs, counts

    def __len__(self) -> int:
        return self.keys.shape[0]


def merge_runs(a: Run, b: Run, arena: np.ndarray | None) -> Run:
    """One run of the states of runs ``a`` and ``b``, the counts of equal
    states added (``arena``: the rows their refs point to; None for runs of
    keys)."""
    cap = len(a) + len(b)
    keys = np.empty(cap, np.uint64)
    counts = np.empty(cap, np.int64)
    if a.refs is None:
        m = _merge_keys(a.keys, a.counts, b.keys, b.counts, keys, counts)
        return Run(trimmed(keys, m), None, trimmed(counts, m))
    refs = np.empty(cap, np.int64)
    m = _merge_refs(a.keys, a.refs, a.counts, b.keys, b.refs, b.counts, arena, keys, refs, counts)
    return Run(trimmed(keys, m), trimmed(refs, m), trimmed(counts, m))


def merge_many(runs: list[Run], arena: np.ndarray | None) -> Run | None:
    """One run of the states of every run in ``runs`` (each sorted and distinct;
    together in any number), the counts of equal states added; None for no states.

    Merged pairwise level by level, the first level reading the runs
    themselves and every other one going between two buffers of the total
    length, so every state moves once per level (log2 of the number of runs)
    and no array is allocated per merge (fresh memory is what a merge pays
    most for on large runs). The result owns its counts; its keys (and refs)
    are new arrays unless a single run is given, whose keys it shares (keys
    are never written).
    """
    runs = [run for run in runs if len(run)]
    if not runs:
        return None
    if len(runs) == 1:
        return Run(runs[0].keys, runs[0].refs, runs[0].counts.copy())
    total = sum(len(run) for run in runs)
    level = [(run.keys, run.refs, np.asarray(run.counts, np.int64)) for run in runs]
    buffers = [_run_buffers(total, arena is not None), None]
    side = 0
    while len(level) > 1:
        if buffers[side] is None:
            buffers[side] = _run_buffers(total, arena is not None)
        out_keys, out_refs, out_counts = buffers[side]
        merged, at = [], 0
        for i in range(0, len(level), 2):
            keys, refs, counts = level[i]
            if i + 1 == len(level):  # the odd one out moves on as it is
                m = len(keys)
                out_keys[at : at + m], out_counts[at : at + m] = keys, counts
                if refs is not None:
                    out_refs[at : at + m] = refs
            elif refs is None:
                keys2, _, counts2 = level[i + 1]
                m = _merge_keys(keys, counts, keys2, counts2, out_keys[at:], out_counts[at:])
            else:
                keys2, refs2, counts2 = level[i + 1]
                m = _merge_refs(
                    keys, refs, counts, keys2, refs2, counts2, arena, out_keys[at:], out_refs[at:], out_counts[at:]
                )  # fmt: skip
            merged.append((out_keys[at : at + m], None if refs is None else out_refs[at : at + m], out_counts[at : at + m]))
            at += m
        level = merged
        side = 1 - side
    m = len(level[0][0])
    del level, merged  # views of the buffer about to be shrunk in place
    out_keys, out_refs, out_counts = buffers[1 - side]
    return Run(trimmed(out_keys, m), None if out_refs is None else trimmed(out_refs, m), trimmed(out_counts, m))


def _run_buffers(n: int, with_refs: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Empty ``(keys, refs or None, counts)`` arrays of ``n`` states, for :func:`merge_many`."""
    return np.empty(n, np.uint64), np.empty(n, np.int64) if with_refs else None, np.empty(n, np.int64)
