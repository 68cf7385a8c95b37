"""Sorting the counter's unsigned keys in place: numpy's sort or an LSD radix
sort, whichever this machine runs faster.

Counting states that are nearly all distinct is mostly sorting: a batch of
state keys (uint32 or uint64) before its run-length count, a batch of long
states' hash tags before their dedup. numpy's quicksort dispatches to
x86-simd-sort's AVX-512 code wherever AVX-512 exists, and on AMD Zen 4 that
code is 5-10x slower than numpy's own AVX2 code (its compress-store to memory
is microcoded there): 25-60 ns a key on one 2-core EPYC VM of this project
against 5-15 ns for the radix sort below, while on another numpy's sort ran
at 4-13 ns and won. So the first sort of a dtype large enough to matter
times both on the same random keys and keeps the faster for the process;
both give the same sorted array, so the choice changes speed, never counts.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from .jit import kernel

__all__ = ["radix_sort", "radix_faster", "sort_keys"]

# Below this many keys numpy's sort is used whatever the machine: the radix
# sort's fixed cost (histograms of 256 counts per byte) is not worth paying.
_SMALL = 2048
_RADIX_DTYPES = (np.dtype(np.uint32), np.dtype(np.uint64))  # (a signed key's shift would index below 0)
_CALIBRATION_KEYS = 1 << 16
_CALIBRATION_ROUNDS = 3


@kernel(inline="always")
def _scatter(src, dst, counts, shift):
    """One stable pass: ``src`` into ``dst`` ordered by the byte at ``shift``
    (``counts``: how many keys have each value of that byte)."""
    starts = np.empty(256, np.int64)
    total = 0
    for b in range(256):
        starts[b] = total
        total += counts[b]
    for i in range(src.size):
        v = src[i]
        b = (v >> shift) & 0xFF
        dst[starts[b]] = v
        starts[b] += 1


@kernel
def radix_sort(keys, scratch):
    """Sort ``keys`` (uint32 or uint64, contiguous) in place, least significant
    byte first; ``scratch``: at least as many keys of the same dtype, overwritten.
    A byte that every key shares costs no pass (the low bytes of the keys of
    short states are zero)."""
    n = keys.size
    if n < 2:
        return
    n_bytes = keys.itemsize
    counts = np.zeros((8, 256), np.int64)
    if n_bytes == 8:
        for i in range(n):
            v = keys[i]
            counts[0, v & 0xFF] += 1
            counts[1, (v >> 8) & 0xFF] += 1
            counts[2, (v >> 16) & 0xFF] += 1
            counts[3, (v >> 24) & 0xFF] += 1
            counts[4, (v >> 32) & 0xFF] += 1
            counts[5, (v >> 40) & 0xFF] += 1
            counts[6, (v >> 48) & 0xFF] += 1
            counts[7, v >> 56] += 1
    else:
        for i in range(n):
            v = keys[i]
            counts[0, v & 0xFF] += 1
            counts[1, (v >> 8) & 0xFF] += 1
            counts[2, (v >> 16) & 0xFF] += 1
            counts[3, v >> 24] += 1
    src = keys
    dst = scratch[:n]
    in_scratch = False
    for d in range(n_bytes):
        if counts[d, (keys[0] >> (8 * d)) & 0xFF] == n:
            continue  # every key has this byte: nothing would move
        _scatter(src, dst, counts[d], 8 * d)
        src, dst = dst, src
        in_scratch = not in_scratch
    if in_scratch:
        keys[:] = src


def _best_of(sort, keys: np.ndarray, scratch: np.ndarray) -> float:
    best = float("inf")
    for _ in range(_CALIBRATION_ROUNDS):
        trial = keys.copy()
        start = time.perf_counter()
        sort(trial, scratch)
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def radix_faster(dtype: np.dtype) -> bool:
    """Whether the radix sort sorts random keys of ``dtype`` faster than
    numpy's sort on this machine (timed once a process, a few milliseconds)."""
    keys = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, _CALIBRATION_KEYS, dtype=dtype, endpoint=True)
    scratch = np.empty_like(keys)
    radix_sort(keys[:2].copy(), scratch)  # compiled (or loaded) before it is timed
    return _best_of(radix_sort, keys, scratch) < _best_of(lambda k, _: k.sort(), keys, scratch)


def sort_keys(keys: np.ndarray, scratch: np.ndarray | None = None) -> None:
    """Sort ``keys`` (contiguous uint32 or uint64; other dtypes by numpy) in
    place, by the faster sort of this machine; ``scratch`` (optional,
    contiguous, at least as many bytes as ``keys``, of any dtype, overwritten)
    spares the radix sort allocating its own."""
    if keys.size < _SMALL or keys.dtype not in _RADIX_DTYPES or not radix_faster(keys.dtype):
        keys.sort()
        return
    if scratch is None or scratch.nbytes < keys.nbytes:
        scratch = np.empty_like(keys)
    radix_sort(keys, scratch.reshape(-1).view(np.uint8)[: keys.nbytes].view(keys.dtype))
