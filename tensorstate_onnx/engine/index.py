"""KeyIndex: a hash index of the keys of one run, so that states seen before
are counted where they arrive, without being sorted.

While states repeat (a trained network on data like its training data: a
layer of 20 neurons takes a few thousand states, seen millions of times),
sorting every state only to find it in the run costs several times more than
looking it up in a table that fits in the cache. The index maps each key of
the run to its position; a state it holds adds 1 to the run's count in
place, and only the others wait in the buffer to be sorted and counted.
States of up to 8 bytes are their own keys; longer ones are keyed by their
hash, which several states may share, so a hash found is only a candidate
until the state's words equal those the run refers to.
"""

from __future__ import annotations

import numpy as np

from .jit import kernel

__all__ = ["KeyIndex"]

_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # 2**64 / golden ratio, odd: spreads keys over the high bits


@kernel(inline="always")
def _slot(key, shift):
    return np.int64((key * _FIBONACCI) >> shift)


@kernel
def _fill(keys, slot_keys, slot_refs, shift):
    """Put every key of ``keys`` in the table (equal hashes of long states
    each in a slot of their own), open addressing with linear probes."""
    mask = slot_refs.size - 1
    for i in range(keys.size):
        h = _slot(keys[i], shift)
        while slot_refs[h] >= 0:
            h = (h + 1) & mask
        slot_keys[h] = keys[i]
        slot_refs[h] = i


@kernel(inline="always")
def _candidate(h, key, slot_keys, slot_refs):
    """From slot ``h`` on (linear probes), the first slot that is empty or
    holds ``key``."""
    mask = slot_refs.size - 1
    while slot_refs[h] >= 0 and slot_keys[h] != key:
        h = (h + 1) & mask
    return h


@kernel
def _count_keys(keys, start, slot_keys, slot_refs, shift, counts, pending, n_pending):
    """``keys`` from ``start`` on: a key the table holds adds 1 to its count in
    ``counts``, any other goes to ``pending[n_pending:]``, until the keys or
    ``pending`` run out. Returns ``(next key, n_pending, keys found)``."""
    cap = pending.size
    hits = 0
    i = start
    while i < keys.size and n_pending < cap:
        key = keys[i]
        ref = slot_refs[_candidate(_slot(key, shift), key, slot_keys, slot_refs)]
        if ref < 0:
            pending[n_pending] = key
            n_pending += 1
        else:
            counts[ref] += 1
            hits += 1
        i += 1
    return i, n_pending, hits


@kernel
def _count_rows(words, hashes, start, slot_keys, slot_refs, shift, run_refs, counts, arena, first, n_pending, cap):
    """Rows of ``words`` (their ``hashes`` the keys) from ``start`` on: a row
    equal to the arena row that the run refers to under an equal key adds 1
    to its count in ``counts``; any other is copied to arena row ``first +
    n_pending`` and on, until the rows run out or ``cap`` rows are pending.
    Returns ``(next row, n_pending, rows found)``."""
    mask = slot_refs.size - 1
    n_words = words.shape[1]
    hits = 0
    i = start
    while i < words.shape[0] and n_pending < cap:
        key = hashes[i]
        h = _slot(key, shift)
        while True:
            ref = slot_refs[h]
            if ref < 0:
                row = first + n_pending
                for w in range(n_words):
                    arena[row, w] = words[i, w]
                n_pending += 1
                break
            if slot_keys[h] == key:
                held = run_refs[ref]
                w = 0
                while w < n_words and arena[held, w] == words[i, w]:
                    w += 1
                if w == n_words:
                    counts[ref] += 1
                    hits += 1
                    break
            h = (h + 1) & mask
        i += 1
    return i, n_pending, hits


class KeyIndex:
    """Where each key of one run (sorted uint64 keys: distinct states, or
    hashes of distinct states) sits in it."""

    def __init__(self, keys: np.ndarray):
        bits = max(4, int(keys.size).bit_length() + 1)  # at most half the slots taken
        self.shift = np.uint64(64 - bits)
        self.slot_keys = np.empty(1 << bits, np.uint64)
        self.slot_refs = np.full(1 << bits, -1, np.int32)
        _fill(keys, self.slot_keys, self.slot_refs, self.shift)

    @property
    def nbytes(self) -> int:
        return self.slot_keys.nbytes + self.slot_refs.nbytes

    def count_keys(
        self, keys: np.ndarray, start: int, counts: np.ndarray, pending: np.ndarray, n_pending: int
    ) -> tuple[int, int, int]:
        """Count the ``keys`` from ``start`` on that the run holds into its
        ``counts``; put the others in ``pending`` from ``n_pending`` on, while
        it has room. Returns ``(next key, n_pending, keys found)``."""
        return _count_keys(keys, start, self.slot_keys, self.slot_refs, self.shift, counts, pending, n_pending)

    def count_rows(
        self, words: np.ndarray, hashes: np.ndarray, run_refs: np.ndarray, counts: np.ndarray,
        arena: np.ndarray, first: int, n_pending: int, cap: int,
    ) -> tuple[int, int, int]:  # fmt: skip
        """Count the rows of ``words`` (uint64 (n, n_words), keyed by their
        ``hashes``) that the run holds -- its states are the ``arena`` rows
        ``run_refs`` -- into its ``counts``; copy the others to ``arena`` rows
        ``first + n_pending`` on, while fewer than ``cap`` are pending.
        Returns ``(next row, n_pending, rows found)``."""
        return _count_rows(
            words, hashes, 0, self.slot_keys, self.slot_refs, self.shift, run_refs, counts, arena, first, n_pending, cap
        )
