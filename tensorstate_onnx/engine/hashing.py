"""States longer than 8 bytes: a 64-bit hash of their words, and the distinct
rows of a batch in (hash, words) order.

A batch is sorted by hash bits with the row index in the low bits (one sort of
uint64 tags, no argsort: rows with equal hash bits stay in row order); rows sharing those hash bits are compared word by word, so
states whose hashes collide are told apart by their words (never merged unless
every word is equal).
"""

from __future__ import annotations

import sys

import numpy as np

from .arrays import as_words, trimmed
from .jit import kernel
from .radix import sort_keys

__all__ = [
    "cmp_words", "dedup_words", "hash_part_starts", "hash_partition", "hash_rows", "in_run_order", "key_partition",
    "partition_of", "scatter_keys", "scatter_rows", "tag",
]  # fmt: skip


@kernel(inline="always")
def _mix(h, w):
    h ^= w
    h *= np.uint64(0xFF51AFD7ED558CCD)
    return h ^ (h >> np.uint64(32))


@kernel
def _hash_rows_kernel(words, out):
    """Four independent lanes over the words (for instruction-level
    parallelism on long rows), then a final avalanche."""
    n_words = words.shape[1]
    n_quad = n_words - n_words % 4
    for i in range(words.shape[0]):
        h0 = np.uint64(0x9E3779B97F4A7C15)
        h1 = np.uint64(0xBF58476D1CE4E5B9)
        h2 = np.uint64(0x94D049BB133111EB)
        h3 = np.uint64(0x2545F4914F6CDD1D)
        for w in range(0, n_quad, 4):
            h0 = _mix(h0, words[i, w])
            h1 = _mix(h1, words[i, w + 1])
            h2 = _mix(h2, words[i, w + 2])
            h3 = _mix(h3, words[i, w + 3])
        for w in range(n_quad, n_words):
            h0 = _mix(h0, words[i, w])
        h = h0 ^ ((h1 << np.uint64(16)) | (h1 >> np.uint64(48)))
        h ^= (h2 << np.uint64(32)) | (h2 >> np.uint64(32))
        h ^= (h3 << np.uint64(48)) | (h3 >> np.uint64(16))
        h ^= np.uint64(n_words)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(32)
        out[i] = h


def hash_rows(words: np.ndarray) -> np.ndarray:
    """64-bit hash of each row of ``words`` (uint64 (n, n_words)).

    Any function works (the counts never depend on it being collision-free, only
    the speed does), but it must be deterministic: runs from other counters and
    other processes are merged by it.
    """
    out = np.empty(words.shape[0], np.uint64)
    _hash_rows_kernel(words, out)
    return out


@kernel
def _mix_keys(keys, n_parts, out):
    """The part of each state of up to 8 bytes, from its key (a 64-bit finalizer, then modulo)."""
    for i in range(keys.size):
        h = keys[i]
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(33)
        h *= np.uint64(0xC4CEB9FE1A85EC53)
        h ^= h >> np.uint64(33)
        out[i] = np.int64(h % np.uint64(n_parts))


def key_partition(keys: np.ndarray, n_parts: int) -> np.ndarray:
    """:func:`partition_of` for states of up to 8 bytes given as their keys
    (big-endian uint64, as ``KeyRuns`` holds them), without the bytes."""
    out = np.empty(keys.size, np.int64)
    _mix_keys(keys, n_parts, out)
    return out


@kernel
def _hash_parts(hashes, n_parts, out):
    for i in range(hashes.size):
        out[i] = np.int64(((hashes[i] >> np.uint64(32)) * np.uint64(n_parts)) >> np.uint64(32))


def hash_partition(hashes: np.ndarray, n_parts: int) -> np.ndarray:
    """The part of each state longer than 8 bytes, from its :func:`hash_rows`
    hash: ``floor(hash / 2**64 * n_parts)`` (of the hash's top 32 bits), so
    parts are ranges of hashes and a run in hash order splits into slices."""
    out = np.empty(hashes.size, np.int64)
    _hash_parts(hashes, n_parts, out)
    return out


def hash_part_starts(n_parts: int) -> np.ndarray:
    """The smallest hash of each of the ``n_parts`` parts of :func:`hash_partition`."""
    top = np.arange(n_parts, dtype=np.uint64) << np.uint64(32)  # j * 2**32, below 2**63 for n_parts <= 2**31
    return ((top + np.uint64(n_parts - 1)) // np.uint64(n_parts)) << np.uint64(32)  # ceil(j * 2**32 / n_parts)


def partition_of(packed: np.ndarray, n_parts: int) -> np.ndarray:
    """Which of ``n_parts`` partitions each packed state (uint8 (n, n_bytes))
    belongs to, as int64, from a hash of the state. States of up to 8 bytes
    are hashed as one big-endian word (:func:`key_partition`), longer ones by
    :func:`hash_rows` of their little-endian words (:func:`hash_partition`).

    The words are read the same way whatever the host, so every process on
    every machine puts a state in the same partition: sharded runs merge
    partition ``j`` of every shard, and must never split one state between
    two partitions.
    """
    if packed.shape[1] <= 8:
        from .keys import be_keys

        return key_partition(be_keys(packed), n_parts)
    words = as_words(packed, -(-packed.shape[1] // 8))
    if sys.byteorder == "big":
        words = words.byteswap()
    return hash_partition(hash_rows(words), n_parts)


def scatter_keys(keys: np.ndarray, counts: np.ndarray, which: np.ndarray, bounds: np.ndarray):
    """:func:`scatter_rows` for keys (uint64 (n,)) instead of rows."""
    out_ids, out_counts = scatter_rows(keys.reshape(-1, 1), counts, which, bounds)
    return out_ids.reshape(-1), out_counts


@kernel
def _scatter_kernel(ids, counts, which, starts, out_ids, out_counts):
    for i in range(ids.shape[0]):
        j = which[i]
        k = starts[j]
        starts[j] = k + 1
        out_counts[k] = counts[i]
        for b in range(ids.shape[1]):
            out_ids[k, b] = ids[i, b]


def scatter_rows(
    ids: np.ndarray, counts: np.ndarray, which: np.ndarray, bounds: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``ids`` (uint8 (n, width)) and ``counts`` (int64) grouped by
    ``which``: group ``j`` in rows ``bounds[j]:bounds[j + 1]``, each group in
    its original order (one pass: a counting sort)."""
    out_ids = np.empty_like(ids, order="C")
    out_counts = np.empty(counts.shape[0], np.int64)
    _scatter_kernel(ids, counts, which, bounds[:-1].copy(), out_ids, out_counts)
    return out_ids, out_counts


@kernel
def tag(hashes, bits, out):
    """Sort keys: the high bits of each hash with the row index in the low ``bits``."""
    high = ~((np.uint64(1) << np.uint64(bits)) - np.uint64(1))
    for i in range(hashes.size):
        out[i] = (hashes[i] & high) | np.uint64(i)


# The comparisons below have one exit and no early return: numba then prunes
# the reference counting of their array arguments, which otherwise costs two
# atomic operations per array and call (40-90 ns, in loops that run per state).
# They repeat the word loop on purpose: _cmp calling cmp_words behind a branch
# brings the reference counting back (25 instead of 3 ns per row in dedup_words).


@kernel
def _cmp(ha, ka, a, hb, kb, b):
    """Order of row ``a`` of (ha, ka) and row ``b`` of (hb, kb): by hash, then words (-1, 0 or 1)."""
    x = ha[a]
    y = hb[b]
    n_words = ka.shape[1]
    w = 0
    while x == y and w < n_words:
        x = ka[a, w]
        y = kb[b, w]
        w += 1
    return (x > y) - (x < y)


@kernel
def cmp_words(ka, a, kb, b):
    """Order of row ``a`` of ``ka`` and row ``b`` of ``kb`` by their words (-1, 0 or 1)."""
    x = np.uint64(0)
    y = np.uint64(0)
    n_words = ka.shape[1]
    w = 0
    while x == y and w < n_words:
        x = ka[a, w]
        y = kb[b, w]
        w += 1
    return (x > y) - (x < y)


@kernel
def in_run_order(hashes, words):
    """Whether rows ``0..hashes.size`` of ``words`` are distinct and in (hash, words) order."""
    for i in range(1, hashes.size):
        if hashes[i - 1] > hashes[i]:
            return False
        if hashes[i - 1] == hashes[i] and cmp_words(words, i - 1, words, i) >= 0:
            return False
    return True


@kernel
def _sort_group(rows, hashes, words):
    """Sort row indices by (hash, words): a bottom-up merge sort (stable, n log n)."""
    n = rows.size
    src = rows.copy()
    buf = np.empty(n, np.int64)
    width = 1
    while width < n:
        for lo in range(0, n, 2 * width):
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                if _cmp(hashes, words, src[j], hashes, words, src[i]) < 0:
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
            while j < hi:
                buf[k] = src[j]
                j += 1
                k += 1
        src, buf = buf, src
        width *= 2
    return src


@kernel
def _dedup_tagged(tagged, bits, hashes, words, weights, rows_out, counts_out, max_reps):
    """Distinct rows of a batch from its sorted tags; returns how many.

    Rows whose tags share the hash bits form a group (almost always one row, or
    copies of one state). Within a group the distinct rows are found by
    comparing hashes and then words, and are emitted in (hash, words) order,
    so the output is sorted by (hash, words) with every state once.
    ``rows_out`` gets a row index of each distinct state, ``counts_out`` the
    summed weights (an empty ``weights`` means 1 for every row).
    """
    mask = (np.uint64(1) << np.uint64(bits)) - np.uint64(1)
    n = tagged.size
    unit = weights.size == 0
    reps = np.empty(max_reps, np.int64)
    rep_counts = np.empty(max_reps, np.int64)
    k = 0
    i = 0
    while i < n:
        top = tagged[i] >> np.uint64(bits)
        j = i + 1
        while j < n and (tagged[j] >> np.uint64(bits)) == top:
            j += 1
        if j == i + 1:
            r = np.int64(tagged[i] & mask)
            rows_out[k] = r
            counts_out[k] = 1 if unit else weights[r]
            k += 1
            i = j
            continue
        n_reps = 0
        overflow = False
        for g in range(i, j):
            r = np.int64(tagged[g] & mask)
            found = False
            for q in range(n_reps):
                if _cmp(hashes, words, reps[q], hashes, words, r) == 0:
                    rep_counts[q] += 1 if unit else weights[r]
                    found = True
                    break
            if not found:
                if n_reps == max_reps:
                    overflow = True
                    break
                reps[n_reps] = r
                rep_counts[n_reps] = 1 if unit else weights[r]
                n_reps += 1
        if overflow:
            # Many distinct states share these hash bits: sort the group.
            group = np.empty(j - i, np.int64)
            for g in range(i, j):
                group[g - i] = np.int64(tagged[g] & mask)
            group = _sort_group(group, hashes, words)
            g = 0
            while g < group.size:
                r = group[g]
                total = 1 if unit else weights[r]
                g += 1
                while g < group.size and _cmp(hashes, words, r, hashes, words, group[g]) == 0:
                    total += 1 if unit else weights[group[g]]
                    g += 1
                rows_out[k] = r
                counts_out[k] = total
                k += 1
        else:
            # Insertion sort of the few distinct rows by (hash, words).
            for a in range(1, n_reps):
                r = reps[a]
                c = rep_counts[a]
                b = a - 1
                while b >= 0 and _cmp(hashes, words, r, hashes, words, reps[b]) < 0:
                    reps[b + 1] = reps[b]
                    rep_counts[b + 1] = rep_counts[b]
                    b -= 1
                reps[b + 1] = r
                rep_counts[b + 1] = c
            for q in range(n_reps):
                rows_out[k] = reps[q]
                counts_out[k] = rep_counts[q]
                k += 1
        i = j
    return k


def dedup_words(
    words: np.ndarray, hashes: np.ndarray, weights: np.ndarray, max_reps: int
) -> tuple[np.ndarray, np.ndarray]:
    """The distinct rows of ``words`` (native uint64 (n, n_words)) whose
    hashes are ``hashes``, each row weighted (empty ``weights``: once each):
    ``(row index of each distinct state, its count)``, the states in (hash,
    words) order. ``max_reps``: distinct rows compared one by one within a
    group of equal hash bits before the group is sorted instead."""
    n = words.shape[0]
    bits = max(1, int(n - 1).bit_length())
    tagged = np.empty(n, np.uint64)
    tag(hashes, bits, tagged)
    rows = np.empty(n, np.int64)
    sort_keys(tagged, scratch=rows)
    counts = np.empty(n, np.int64)
    k = _dedup_tagged(tagged, bits, hashes, words, weights, rows, counts, max_reps)
    return rows[:k], trimmed(counts, k)
