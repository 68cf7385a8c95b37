"""The state engine: quantize and bit-pack tensors, unpack, and count states.

A neuron fires iff its value is ``> 0``; ``0.0``, ``-0.0``, NaN and negatives do
not fire, ``+inf`` does. One state is the firing pattern of the ``C`` neurons on
the channel axis at one position; it is stored as ``ceil(C/8)`` bytes, LSB first
(byte ``k`` bit ``j`` is neuron ``8k+j``), byte-for-byte what
``np.packbits(np.moveaxis(x, axis, -1).reshape(-1, C) > 0, axis=-1,
bitorder="little")`` gives. States come batch first, then the other positions in
row-major order.

Large inputs are packed by several threads at once (the kernels release the
GIL); small ones on the calling thread.

:class:`StateCounter` counts packed states as they stream in, with memory that
follows the number of distinct states, and merges and pickles compactly (see
the notes at "counting" below). ``result()`` is unsorted by default (cheap);
``result(sort=True)`` gives ``np.unique``'s lexicographic order.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

__all__ = ["pack", "unpack", "StateCounter", "n_bytes_for"]

def n_bytes_for(n_neurons: int) -> int:
    """Bytes of one packed state of ``n_neurons`` neurons."""
    return (n_neurons + 7) // 8


# --------------------------------------------------------------------------- pack

# Inputs smaller than this are packed on the calling thread; thread start-up
# would cost more than it saves.
_PARALLEL_MIN_BYTES = 1 << 22
_N_THREADS = max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_N_THREADS, thread_name_prefix="tensorstate-pack")
        return _pool


@numba.njit(cache=True, nogil=True, inline="always")
def _fires(v, lo, hi):
    """Whether a neuron of value ``v`` fires: ``v > lo``, and ``v <= hi`` unless
    ``hi`` is None (the check is then compiled away)."""
    if hi is None:
        return v > lo
    return (v > lo) & (v <= hi)


@numba.njit(cache=True, nogil=True)
def _pack_flat_by8(flat, lo, hi, out, head, out64):
    """Channels-last contiguous data with C a multiple of 8: byte i from values 8i..8i+7.

    ``out64`` is ``out[head:head + 8k]`` as uint64 (``head``: the bytes before
    the first 8-byte aligned one): eight bytes from 64 values at a time. The
    64-value inner loop vectorizes with wide loads and shuffles; narrower
    groups (16 values to a uint16) were compiled to gathers on some CPUs,
    5-6x slower.
    """
    n_out = out.size
    for i in range(min(head, n_out)):
        byte = np.uint32(0)
        for j in range(8):
            byte |= np.uint32(_fires(flat[8 * i + j], lo, hi)) << j
        out[i] = byte
    body = flat[8 * head :]  # (an offset inside the index would defeat vectorization)
    for i in range(out64.size):
        word = np.uint64(0)
        for j in range(64):
            word |= np.uint64(_fires(body[64 * i + j], lo, hi)) << np.uint64(j)
        out64[i] = word
    for i in range(head + 8 * out64.size, n_out):
        byte = np.uint32(0)
        for j in range(8):
            byte |= np.uint32(_fires(flat[8 * i + j], lo, hi)) << j
        out[i] = byte


@numba.njit(cache=True, nogil=True)
def _pack_rows(x, lo, hi, out):
    """``x`` is ``(a, b, C)``: the channels are the fastest axis (channels-last)."""
    n_a, n_b, n_c = x.shape
    full = n_c // 8
    for a in range(n_a):
        for b in range(n_b):
            row = a * n_b + b
            for k in range(full):
                byte = np.uint32(0)
                for j in range(8):
                    v = x[a, b, 8 * k + j]
                    byte |= np.uint32(_fires(v, lo, hi)) << j
                out[row, k] = byte
            if full * 8 < n_c:
                byte = np.uint32(0)
                for c in range(full * 8, n_c):
                    v = x[a, b, c]
                    byte |= np.uint32(_fires(v, lo, hi)) << (c - 8 * full)
                out[row, full] = byte


@numba.njit(cache=True, nogil=True)
def _byte_of_eight(x, a, c, b0, width, lo, hi, dst):
    """Bits of channels ``c..c+7`` at positions ``b0..b0+width`` of ``x[a]`` into ``dst``."""
    s0 = x[a, c, b0 : b0 + width]
    s1 = x[a, c + 1, b0 : b0 + width]
    s2 = x[a, c + 2, b0 : b0 + width]
    s3 = x[a, c + 3, b0 : b0 + width]
    s4 = x[a, c + 4, b0 : b0 + width]
    s5 = x[a, c + 5, b0 : b0 + width]
    s6 = x[a, c + 6, b0 : b0 + width]
    s7 = x[a, c + 7, b0 : b0 + width]
    for p in range(width):
        dst[p] = (
            np.uint32(_fires(s0[p], lo, hi))
            | np.uint32(_fires(s1[p], lo, hi)) << 1
            | np.uint32(_fires(s2[p], lo, hi)) << 2
            | np.uint32(_fires(s3[p], lo, hi)) << 3
            | np.uint32(_fires(s4[p], lo, hi)) << 4
            | np.uint32(_fires(s5[p], lo, hi)) << 5
            | np.uint32(_fires(s6[p], lo, hi)) << 6
            | np.uint32(_fires(s7[p], lo, hi)) << 7
        )


@numba.njit(cache=True, nogil=True)
def _bytes_of_rows(x, a, b0, groups, width, lo, hi, block):
    """Byte ``k`` (channels ``8k..8k+7``) of positions ``b0..b0+width`` of
    ``x[a]`` into ``block[k]``, for ``k < groups``.

    Each channel row is read in one pass and OR-ed into its bit of
    ``block[k]`` (at most 4 KiB, in L1), so a contiguous sample streams
    through memory in order: up to 1.6x faster than reading the eight rows
    side by side when rows are short (small feature maps), where eight short
    streams at once defeat the hardware prefetcher.
    """
    for k in range(groups):
        dst = block[k]
        src = x[a, 8 * k, b0 : b0 + width]
        for p in range(width):
            dst[p] = np.uint8(_fires(src[p], lo, hi))
        for j in range(1, 8):
            src = x[a, 8 * k + j, b0 : b0 + width]
            for p in range(width):
                dst[p] |= np.uint8(_fires(src[p], lo, hi)) << j


@numba.njit(cache=True, nogil=True, inline="always")
def _put8(out, row, col, word):
    """The 8 bytes of ``word`` (little-endian) into ``out[row, col:col+8]``."""
    for i in range(8):
        out[row, col + i] = np.uint8(word >> np.uint64(8 * i))


@numba.njit(cache=True, nogil=True)
def _pack_cols(x, lo, hi, out, out64):
    """``x`` is ``(a, C, b)``: the positions are the fastest axis (channels-first).

    Byte k of a block of positions comes from channels 8k..8k+7, read along
    the positions so that every load streams through memory. With one byte
    per state the bytes go straight to the output (eight rows read side by
    side); otherwise a block of bytes (byte k of positions p.., one channel
    row after the other) is transposed into the output rows 8x8 bytes at a
    time (``out64``: ``out`` as uint64 words, or empty to store bytes).
    """
    n_a, n_c, n_b = x.shape
    n_bytes = out.shape[1]
    full = n_c // 8
    if n_bytes == 1:
        for a in range(n_a):
            for b0 in range(0, n_b, 4096):
                width = min(4096, n_b - b0)
                dst = out[a * n_b + b0 : a * n_b + b0 + width, 0]
                if full:
                    _byte_of_eight(x, a, 0, b0, width, lo, hi, dst)
                else:
                    dst[:] = 0
                    for c in range(n_c):
                        src = x[a, c, b0 : b0 + width]
                        for p in range(width):
                            dst[p] |= np.uint8(_fires(src[p], lo, hi)) << c
        return
    width_max = min(4096, max(256, 262144 // n_bytes)) // 8 * 8
    block = np.zeros((n_bytes, width_max), np.uint8)
    words = block.view(np.uint64)
    wide = out64.shape[0] > 0
    n_kw = n_bytes // 8
    for a in range(n_a):
        for b0 in range(0, n_b, width_max):
            width = min(width_max, n_b - b0)
            _bytes_of_rows(x, a, b0, full, width, lo, hi, block)
            if full < n_bytes:
                tail = block[full]
                tail[:width] = 0
                for c in range(8 * full, n_c):
                    src = x[a, c, b0 : b0 + width]
                    for p in range(width):
                        tail[p] |= np.uint8(_fires(src[p], lo, hi)) << (c - 8 * full)
            first = a * n_b + b0
            n_pw = width // 8
            for pw in range(n_pw):
                row = first + 8 * pw
                for kw in range(n_kw):
                    # An 8x8 byte transpose: byte c of r_i is block[8kw + i, 8pw + c].
                    r0 = words[8 * kw, pw]
                    r1 = words[8 * kw + 1, pw]
                    r2 = words[8 * kw + 2, pw]
                    r3 = words[8 * kw + 3, pw]
                    r4 = words[8 * kw + 4, pw]
                    r5 = words[8 * kw + 5, pw]
                    r6 = words[8 * kw + 6, pw]
                    r7 = words[8 * kw + 7, pw]
                    m = np.uint64(0x00FF00FF00FF00FF)
                    s = np.uint64(8)
                    t = ((r0 >> s) ^ r1) & m
                    r1 ^= t
                    r0 ^= t << s
                    t = ((r2 >> s) ^ r3) & m
                    r3 ^= t
                    r2 ^= t << s
                    t = ((r4 >> s) ^ r5) & m
                    r5 ^= t
                    r4 ^= t << s
                    t = ((r6 >> s) ^ r7) & m
                    r7 ^= t
                    r6 ^= t << s
                    m = np.uint64(0x0000FFFF0000FFFF)
                    s = np.uint64(16)
                    t = ((r0 >> s) ^ r2) & m
                    r2 ^= t
                    r0 ^= t << s
                    t = ((r1 >> s) ^ r3) & m
                    r3 ^= t
                    r1 ^= t << s
                    t = ((r4 >> s) ^ r6) & m
                    r6 ^= t
                    r4 ^= t << s
                    t = ((r5 >> s) ^ r7) & m
                    r7 ^= t
                    r5 ^= t << s
                    m = np.uint64(0x00000000FFFFFFFF)
                    s = np.uint64(32)
                    t = ((r0 >> s) ^ r4) & m
                    r4 ^= t
                    r0 ^= t << s
                    t = ((r1 >> s) ^ r5) & m
                    r5 ^= t
                    r1 ^= t << s
                    t = ((r2 >> s) ^ r6) & m
                    r6 ^= t
                    r2 ^= t << s
                    t = ((r3 >> s) ^ r7) & m
                    r7 ^= t
                    r3 ^= t << s
                    # Now byte r of r_i is block[8kw + r, 8pw + i]: row 8pw + i, bytes 8kw...
                    if wide:
                        out64[row, kw] = r0
                        out64[row + 1, kw] = r1
                        out64[row + 2, kw] = r2
                        out64[row + 3, kw] = r3
                        out64[row + 4, kw] = r4
                        out64[row + 5, kw] = r5
                        out64[row + 6, kw] = r6
                        out64[row + 7, kw] = r7
                    else:
                        _put8(out, row, 8 * kw, r0)
                        _put8(out, row + 1, 8 * kw, r1)
                        _put8(out, row + 2, 8 * kw, r2)
                        _put8(out, row + 3, 8 * kw, r3)
                        _put8(out, row + 4, 8 * kw, r4)
                        _put8(out, row + 5, 8 * kw, r5)
                        _put8(out, row + 6, 8 * kw, r6)
                        _put8(out, row + 7, 8 * kw, r7)
                for p in range(8 * pw, 8 * pw + 8):
                    for k in range(8 * n_kw, n_bytes):
                        out[first + p, k] = block[k, p]
            for p in range(8 * n_pw, width):
                for k in range(n_bytes):
                    out[first + p, k] = block[k, p]


def _comparable(x: np.ndarray) -> tuple[np.ndarray, object, object]:
    """A view of ``x`` and bounds ``(lo, hi)`` such that a neuron fires iff
    ``lo < v`` and, unless ``hi`` is None, ``v <= hi``.

    float32/64 compare as floats (NaN fails the test, +inf passes). float16,
    which numba cannot compare, is viewed as int16: positive finite values and
    +inf have bit patterns in ``(0, 0x7C00]``, while negatives, -0.0 and every
    NaN fall outside. bool is viewed as uint8 so that any non-zero byte fires.
    """
    if x.dtype == np.float32 or x.dtype == np.float64:
        return x, x.dtype.type(0), None
    if x.dtype == np.float16:
        return x.view(np.int16), np.int16(0), np.int16(0x7C00)
    if x.dtype == np.bool_:
        return x.view(np.uint8), np.uint8(0), None
    raise TypeError(
        f"pack() takes float16, float32, float64 or bool arrays, got dtype {x.dtype}; "
        "cast other data to float first (a neuron fires iff its value is > 0)"
    )


def _merge_axes(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[list[int], list[int]]:
    """Merge adjacent axes whose strides allow it (no copy) and drop axes of size 1."""
    merged_shape: list[int] = []
    merged_strides: list[int] = []
    for size, stride in zip(shape, strides):
        if size == 1:
            continue
        if merged_shape and merged_strides[-1] == stride * size:
            merged_shape[-1] *= size
            merged_strides[-1] = stride
        else:
            merged_shape.append(size)
            merged_strides.append(stride)
    return merged_shape, merged_strides


def _state_blocks(x: np.ndarray) -> list[np.ndarray]:
    """Split ``x`` (channels on the last axis) into 3-d views ``(a, b, C)`` that
    cover its states in order, without copying data.

    Leading axes are merged where the strides allow; axes that cannot be merged
    are iterated over.
    """
    shape, strides = _merge_axes(x.shape[:-1], x.strides[:-1])
    while len(shape) < 2:
        shape.insert(0, 1)
        strides.insert(0, 0)
    view = np.lib.stride_tricks.as_strided(
        x, shape=(*shape, x.shape[-1]), strides=(*strides, x.strides[-1]), writeable=False
    )
    return [view[idx] for idx in np.ndindex(*shape[:-2])] if len(shape) > 2 else [view]


def _split_work(view: np.ndarray, out: np.ndarray, parts: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Cut one ``(a, b, C)`` block and its output rows into about ``parts`` pieces."""
    n_a, n_b = view.shape[:2]
    if parts == 1:
        return [(view, out)]
    if n_a >= parts:
        bounds = np.linspace(0, n_a, parts + 1).astype(int)
        return [(view[lo:hi], out[lo * n_b : hi * n_b]) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    bounds = np.linspace(0, n_b, max(1, parts // n_a) + 1).astype(int)
    return [
        (view[a : a + 1, lo:hi], out[a * n_b + lo : a * n_b + hi])
        for a in range(n_a)
        for lo, hi in zip(bounds[:-1], bounds[1:])
        if hi > lo
    ]


_NO_WORDS = np.empty((0, 0), np.uint64)


def _run_block(view: np.ndarray, lo, hi, out: np.ndarray) -> None:
    if 0 < abs(view.strides[1]) < abs(view.strides[2]):
        wide = out.shape[1] % 8 == 0 and out.flags.c_contiguous and out.ctypes.data % 8 == 0
        out64 = out.view(np.uint64) if wide else _NO_WORDS
        _pack_cols(view.transpose(0, 2, 1), lo, hi, out, out64)
    elif view.flags.c_contiguous and view.shape[2] % 8 == 0:
        flat_out = out.reshape(-1)
        head = min(-flat_out.ctypes.data % 8, flat_out.size)
        words = (flat_out.size - head) // 8
        _pack_flat_by8(view.reshape(-1), lo, hi, flat_out, head, flat_out[head : head + 8 * words].view(np.uint64))
    else:
        _pack_rows(view, lo, hi, out)


def pack(x: np.ndarray, channel_axis: int = -1) -> np.ndarray:
    """Quantize ``x`` (a neuron fires iff its value is > 0) and bit-pack each state.

    Args:
        x: float16/32/64 or bool array of rank >= 1, any strides and layout.
        channel_axis: the axis holding the neurons; every other position is one
            state. Negative values count from the end.

    Returns:
        ``uint8`` array of shape ``(n_states, ceil(C / 8))``, states batch
        first then positions in row-major order.
    """
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"pack() takes a numpy.ndarray, got {type(x).__name__}; convert it with "
            "np.asarray (torch: tensor.numpy(), tensorflow: tensor.numpy())"
        )
    if x.ndim == 0:
        raise ValueError("pack() needs an array of rank >= 1 (the channel axis); got a scalar")
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
        raise TypeError(f"channel_axis must be an int, got {channel_axis!r}")
    if not -x.ndim <= channel_axis < x.ndim:
        raise ValueError(
            f"channel_axis {channel_axis} is out of range for an array of rank {x.ndim} "
            f"(valid: {-x.ndim}..{x.ndim - 1})"
        )
    n_neurons = x.shape[channel_axis]
    if n_neurons == 0:
        raise ValueError(f"the channel axis {channel_axis} of an array of shape {x.shape} has 0 neurons")
    values, lo, hi = _comparable(x)
    values = np.moveaxis(values, channel_axis, -1)
    out = np.empty((values.size // n_neurons, n_bytes_for(n_neurons)), np.uint8)
    if out.shape[0] == 0:
        return out
    parts = _N_THREADS if x.nbytes >= _PARALLEL_MIN_BYTES else 1
    tasks = []
    start = 0
    for view in _state_blocks(values):
        count = view.shape[0] * view.shape[1]
        tasks += _split_work(view, out[start : start + count], parts)
        start += count
    if len(tasks) == 1 or parts == 1:
        for view, target in tasks:
            _run_block(view, lo, hi, target)
    else:
        for future in [_executor().submit(_run_block, view, lo, hi, target) for view, target in tasks]:
            future.result()
    return out


# ------------------------------------------------------------------------- unpack


def unpack(packed: np.ndarray, n_neurons: int) -> np.ndarray:
    """Invert :func:`pack`: ``bool`` array of shape ``(n_states, n_neurons)``."""
    packed = _check_packed(packed, n_neurons, "unpack()")
    return np.unpackbits(packed, axis=1, count=n_neurons, bitorder="little").view(np.bool_)


def _check_packed(packed: np.ndarray, n_neurons: int, where: str) -> np.ndarray:
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8:
        kind = packed.dtype if isinstance(packed, np.ndarray) else type(packed).__name__
        raise TypeError(f"{where} takes packed states as a uint8 numpy array (from pack()), got {kind}")
    if isinstance(n_neurons, bool) or not isinstance(n_neurons, (int, np.integer)) or n_neurons < 1:
        raise ValueError(f"{where}: n_neurons must be a positive int, got {n_neurons!r}")
    width = n_bytes_for(int(n_neurons))
    if packed.ndim != 2 or packed.shape[1] != width:
        raise ValueError(
            f"{where}: packed states of {n_neurons} neurons have shape (n_states, {width}), "
            f"got {packed.shape}"
        )
    return packed


# ----------------------------------------------------------------------- counting
#
# States of at most two bytes are counted directly (a bincount over 2**16
# values). Longer states are counted in *runs*: distinct states with their
# counts, sorted by a 64-bit key. A batch (or a buffer of small batches) becomes
# one run by a sort-based dedup: numpy's vectorized sort of uint64 keys, then a
# linear pass. Runs are merged pairwise LSM-style (a binary counter: a run is
# merged into the one before it once it is at least half that run's size), so
# merging is sequential, each state is merged O(log(distinct / batch)) times,
# and the runs hold at most about twice the distinct states. A hash table was
# slower here: with millions of distinct states every probe misses the cache.
#
# * States of 3..8 bytes are one big-endian uint64 word: the key is the state
#   itself, exact, and its order is the lexicographic byte order. A dedup is
#   a sort + run lengths, fused with absorbing (below) in one pass over one
#   scratch array; a merge is branch-free. Sorts of 4,096 keys or more
#   are LSD radix sorts that skip digits in which no key differs (the zero low
#   bytes of short states), 1.3-4x faster than np.sort.
# * Longer states are keyed by a 64-bit hash and ordered by (hash, words), so
#   states whose hashes collide are told apart by their words (never merged
#   unless every word is equal). A batch is sorted by hash bits with the row
#   index in the low bits (one sort of uint64 tags, no argsort; the radix sort
#   skips the index bits, which are in order already); rows sharing
#   those hash bits are compared word by word. The words of each distinct state
#   are kept once in an *arena* (copied in the order they arrive); runs hold
#   only (hash, arena row, count), so merges move 24 bytes per state whatever C
#   is. Arena rows of states absorbed are given back at once; those of states
#   merged away are dropped once they are a third of it.

# A batch is split into chunks of at most this many rows (bounds the temporary
# arrays, and keeps enough hash bits above the row index).
_CHUNK_ROWS = 1 << 22
# Small batches are gathered in a buffer and counted together; its size follows
# the distinct states counted so far, within these bounds.
_BUFFER_MIN_BYTES = 1 << 21
_BUFFER_MAX_BYTES = 1 << 25
# Distinct rows compared one by one inside a group of equal hash prefixes before
# the group is sorted instead.
_GROUP_REPS = 8
# A new run holding at least 1/_ABSORB_RATIO as many states as the largest run
# first adds the counts of the states the runs already hold to them, in place;
# only its new states stay a run. When states repeat (a long analysis of data
# seen before) this spares the merges that would copy the largest run, and the
# buffer shrinks to 1/_ABSORB_RATIO of that run. Runs are searched by
# galloping, so a try that finds every state new costs about one compare each.
_ABSORB_RATIO = 8
# A buffer filling while states are new is checked each time it grew by
# 1/_ABSORB_RATIO of the largest run, by looking up its latest states (at most
# this many) in the runs: if most are known it is counted at once and the next
# buffers are small.
_SAMPLE_ROWS = 4096


@numba.njit(cache=True, nogil=True)
def _count_small(packed, counts):
    """Direct counting for states of at most two bytes (index = big-endian value,
    so index order is byte order)."""
    n_bytes = packed.shape[1]
    for i in range(packed.shape[0]):
        v = np.int64(packed[i, 0])
        if n_bytes == 2:
            v = (v << 8) | np.int64(packed[i, 1])
        counts[v] += 1


@numba.njit(cache=True, nogil=True)
def _be_words(packed, out):
    """Each row of up to 8 bytes as one big-endian uint64 (zero padded at the low end)."""
    n_bytes = packed.shape[1]
    shift = np.uint64(8 * (8 - n_bytes))
    for i in range(packed.shape[0]):
        v = np.uint64(0)
        for k in range(n_bytes):
            v = (v << np.uint64(8)) | np.uint64(packed[i, k])
        out[i] = v << shift


@numba.njit(cache=True, nogil=True)
def _be_bytes(keys, out):
    """Inverse of :func:`_be_words`: the first ``out.shape[1]`` bytes of each word."""
    n_bytes = out.shape[1]
    for i in range(keys.size):
        v = keys[i]
        for k in range(n_bytes):
            out[i, k] = np.uint8(v >> np.uint64(56 - 8 * k))


@numba.njit(cache=True, nogil=True, inline="always")
def _gallop(h, i, v):
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


@numba.njit(cache=True, nogil=True)
def _count_known(sorted_keys, h):
    """How many of ``sorted_keys`` occur in the sorted keys ``h`` of a run."""
    i = 0
    found = 0
    for v in sorted_keys:
        i = _gallop(h, i, v)
        if i < h.size and h[i] == v:
            found += 1
    return found


@numba.njit(cache=True, nogil=True)
def _count_sorted_keys(keys, weights, h1, c1, keys_out, counts_out):
    """Count sorted ``keys`` (states as their own keys), each seen ``weights``
    times (empty: once), into the run ``(h1, c1)``: the count of a state the
    run holds is added to ``c1`` in place; the other distinct states go to
    ``keys_out`` (which may be ``keys`` itself) with their counts in
    ``counts_out``. Returns ``(how many were written, distinct keys)``.

    The run is searched by galloping from the last match (:func:`_gallop`).
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
        i = _gallop(h1, i, v)
        if i < n1 and h1[i] == v:
            c1[i] += count
        else:
            keys_out[m] = v
            counts_out[m] = count
            m += 1
        j = e
    return m, distinct


@numba.njit(cache=True, nogil=True, inline="always")
def _mix(h, w):
    h ^= w
    h *= np.uint64(0xFF51AFD7ED558CCD)
    return h ^ (h >> np.uint64(32))


@numba.njit(cache=True, nogil=True)
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


def _hash_rows(words: np.ndarray) -> np.ndarray:
    """64-bit hash of each row of ``words`` (uint64 (n, n_words)).

    Any function works (the counts never depend on it being collision-free, only
    the speed does), but it must be deterministic: runs from other counters and
    other processes are merged by it.
    """
    out = np.empty(words.shape[0], np.uint64)
    _hash_rows_kernel(words, out)
    return out


_RADIX_BITS = 11  # digit width of the radix sort: 2,048 counters stay in L1
_RADIX_MIN = 4096  # below this many keys numpy's sort is as fast


@numba.njit(cache=True, nogil=True)
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


def _sort_keys(keys: np.ndarray, low_bit: int = 0, scratch: np.ndarray | None = None) -> None:
    """Sort uint64 ``keys`` in place; keys equal in bits ``[low_bit, 64)`` must
    already be in order among themselves (their order is kept). ``scratch``:
    room for ``keys.size`` uint64 to sort through (allocated when None)."""
    if keys.size < _RADIX_MIN:
        keys.sort()
    else:
        _radix_sort_kernel(keys, low_bit, np.empty(keys.size, np.uint64) if scratch is None else scratch)


@numba.njit(cache=True, nogil=True)
def _tag(hashes, bits, out):
    """Sort keys: the high bits of each hash with the row index in the low ``bits``."""
    high = ~((np.uint64(1) << np.uint64(bits)) - np.uint64(1))
    for i in range(hashes.size):
        out[i] = (hashes[i] & high) | np.uint64(i)


@numba.njit(cache=True, nogil=True)
def _cmp(ha, ka, a, hb, kb, b):
    """Order of row ``a`` of (ha, ka) and row ``b`` of (hb, kb): by hash, then words."""
    if ha[a] != hb[b]:
        return -1 if ha[a] < hb[b] else 1
    for w in range(ka.shape[1]):
        if ka[a, w] != kb[b, w]:
            return -1 if ka[a, w] < kb[b, w] else 1
    return 0


@numba.njit(cache=True, nogil=True)
def _cmp_words(ka, a, kb, b):
    """Order of row ``a`` of ``ka`` and row ``b`` of ``kb`` by their words."""
    for w in range(ka.shape[1]):
        if ka[a, w] != kb[b, w]:
            return -1 if ka[a, w] < kb[b, w] else 1
    return 0


@numba.njit(cache=True, nogil=True)
def _in_run_order(hashes, words):
    """Whether rows ``0..hashes.size`` of ``words`` are distinct and in (hash, words) order."""
    for i in range(1, hashes.size):
        if hashes[i - 1] > hashes[i]:
            return False
        if hashes[i - 1] == hashes[i] and _cmp_words(words, i - 1, words, i) >= 0:
            return False
    return True


@numba.njit(cache=True, nogil=True)
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


@numba.njit(cache=True, nogil=True)
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


@numba.njit(cache=True, nogil=True)
def _keep_rows(src, rows, dst, base, refs_out):
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


@numba.njit(cache=True, nogil=True)
def _merge_keys(h1, c1, h2, c2, h_out, c_out):
    """Merge two runs whose keys are the states (sorted, distinct), adding the
    counts of equal keys. Branch-free: the interleaving of random runs would
    defeat the branch predictor."""
    n1 = h1.size
    n2 = h2.size
    i = 0
    j = 0
    m = 0
    while i < n1 and j < n2:
        x = h1[i]
        y = h2[j]
        take1 = x <= y
        take2 = y <= x
        h_out[m] = x if take1 else y
        c_out[m] = (c1[i] if take1 else 0) + (c2[j] if take2 else 0)
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


@numba.njit(cache=True, nogil=True)
def _merge_refs(h1, r1, c1, h2, r2, c2, arena, h_out, r_out, c_out):
    """Merge two runs sorted by (hash, words), adding the counts of equal states.

    A run holds hashes, references to arena rows and counts; only those move.
    Unequal hashes (the common case) are merged without a data-dependent
    branch; equal hashes compare the arena rows.
    """
    n1 = h1.size
    n2 = h2.size
    i = 0
    j = 0
    m = 0
    while i < n1 and j < n2:
        x = h1[i]
        y = h2[j]
        if x != y:
            take1 = x < y
            h_out[m] = x if take1 else y
            r_out[m] = r1[i] if take1 else r2[j]
            c_out[m] = c1[i] if take1 else c2[j]
            i += np.int64(take1)
            j += np.int64(not take1)
        else:
            order = _cmp_words(arena, r1[i], arena, r2[j])
            h_out[m] = x
            if order <= 0:
                r_out[m] = r1[i]
                c_out[m] = c1[i]
                if order == 0:
                    c_out[m] += c2[j]
                    j += 1
                i += 1
            else:
                r_out[m] = r2[j]
                c_out[m] = c2[j]
                j += 1
        m += 1
    while i < n1:
        h_out[m] = h1[i]
        r_out[m] = r1[i]
        c_out[m] = c1[i]
        i += 1
        m += 1
    while j < n2:
        h_out[m] = h2[j]
        r_out[m] = r2[j]
        c_out[m] = c2[j]
        j += 1
        m += 1
    return m


@numba.njit(cache=True, nogil=True)
def _absorb_kernel(h1, r1, c1, h2, r2, c2, arena, h_out, r_out, c_out):
    """Add to ``c1`` the counts of the states of run 2 that run 1 holds; write
    the other states of run 2 to the outputs and return how many.

    Runs are sorted by (hash, words); states of equal hashes are told apart by
    their arena rows. The outputs may be run 2 itself. Run 1 is searched by
    galloping (:func:`_gallop`), so a run of new states costs a step or two
    per state.
    """
    n1 = h1.size
    i = 0
    m = 0
    for j in range(h2.size):
        y = h2[j]
        i = _gallop(h1, i, y)
        k = i
        found = False
        while k < n1 and h1[k] == y:
            order = _cmp_words(arena, r1[k], arena, r2[j])
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


@numba.njit(cache=True, nogil=True)
def _close_gaps(arena, start, k, refs):
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


def _trimmed(a: np.ndarray, m: int) -> np.ndarray:
    """The first ``m`` items of ``a``, an array just allocated here and seen
    by nobody else: shrunk in place, so the allocator takes the tail back
    without a copy (a copy briefly doubled the memory of large runs)."""
    if m < a.shape[0]:
        a.resize(m, refcheck=False)
    return a


def _held(a: np.ndarray | None) -> int:
    """Bytes kept alive by ``a`` (its base when it is a view)."""
    if a is None:
        return 0
    return a.base.nbytes if isinstance(a.base, np.ndarray) else a.nbytes


def _as_words(packed: np.ndarray, n_words: int) -> np.ndarray:
    """Rows of ``packed`` as native uint64 words, zero padded (no copy when aligned)."""
    n, width = packed.shape
    if width == 8 * n_words and packed.flags.c_contiguous and packed.ctypes.data % 8 == 0:
        return packed.view(np.uint64)
    padded = np.zeros((n, 8 * n_words), np.uint8)
    padded[:, :width] = packed
    return padded.view(np.uint64)


_UNIT = np.empty(0, np.int64)  # weights meaning "each row once"
_NO_KEYS = np.empty(0, np.uint64)  # an empty run to count into
_NO_COUNTS = np.empty(0, np.int64)


class _Run:
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


def _merge(a: _Run, b: _Run, arena: np.ndarray | None) -> _Run:
    cap = len(a) + len(b)
    keys = np.empty(cap, np.uint64)
    counts = np.empty(cap, np.int64)
    if a.refs is None:
        m = _merge_keys(a.keys, a.counts, b.keys, b.counts, keys, counts)
        return _Run(_trimmed(keys, m), None, _trimmed(counts, m))
    refs = np.empty(cap, np.int64)
    m = _merge_refs(a.keys, a.refs, a.counts, b.keys, b.refs, b.counts, arena, keys, refs, counts)
    return _Run(_trimmed(keys, m), _trimmed(refs, m), _trimmed(counts, m))


class StateCounter:
    """Streaming, mergeable counts of packed states.

    ``add()`` batches of packed states (from :func:`pack`), ``merge()`` other
    counters of the same number of neurons (also after pickling: the pickle
    holds each distinct state once), and read ``result()``. Memory grows with
    the number of distinct states, not with the number of states added: a
    distinct state takes 16 bytes (up to 64 neurons) or its words plus 24
    bytes, at worst about twice over until runs are merged, plus a buffer of
    states not yet counted whose size follows the distinct states (2 MiB to
    32 MiB; an eighth of that while states repeat). ``nbytes`` reports it.

    Order of ``result()``: by default an unspecified but deterministic order
    (for states of up to 64 neurons it is the lexicographic byte order, beyond
    that roughly the order in which states were first seen);
    ``result(sort=True)`` gives lexicographic byte order, the order of
    ``np.unique(packed, axis=0)``, at the cost of a sort.
    """

    def __init__(self, n_neurons: int):
        if isinstance(n_neurons, bool) or not isinstance(n_neurons, (int, np.integer)) or n_neurons < 1:
            raise ValueError(f"StateCounter needs a positive number of neurons, got {n_neurons!r}")
        self.n_neurons = int(n_neurons)
        self.n_bytes = n_bytes_for(self.n_neurons)
        self.total = 0
        self._small = self.n_bytes <= 2
        if self._small:
            self._direct = np.zeros(1 << (8 * self.n_bytes), np.int64)
            return
        self._n_words = (self.n_bytes + 7) // 8
        # Runs own their count arrays: absorbing adds to them in place.
        self._runs: list[_Run] = []
        # Whether the last absorbing try found most states counted already,
        # and the pending rows at which to check the buffer for repeats next.
        self._repeating = False
        self._next_check = 0
        self._n_pending = 0
        # Up to 8 bytes: states waiting to be counted, as big-endian words.
        self._pending: np.ndarray | None = None
        # More than 8 bytes: the arena holds the words of the states the runs
        # refer to (rows [0, _arena_rows)), then the states waiting to be
        # counted (the next _n_pending rows).
        self._arena: np.ndarray | None = None
        self._arena_rows = 0

    @property
    def n_distinct(self) -> int:
        """Number of distinct states seen so far."""
        if self._small:
            return int(np.count_nonzero(self._direct))
        run = self._compact()
        return 0 if run is None else len(run)

    @property
    def nbytes(self) -> int:
        """Bytes of counting state held: states, keys, counts and buffers."""
        if self._small:
            return self._direct.nbytes
        held = sum(_held(r.keys) + _held(r.refs) + _held(r.counts) for r in self._runs)
        return held + _held(self._pending) + _held(self._arena)

    def add(self, packed: np.ndarray) -> None:
        """Count a batch of packed states (``uint8 (n, ceil(C/8))``)."""
        packed = _check_packed(packed, self.n_neurons, "StateCounter.add()")
        n = packed.shape[0]
        if n == 0:
            return
        if self._small:
            _count_small(packed, self._direct)
        elif self._n_words == 1:
            self._add_keys(packed)
        else:
            self._add_words(packed)
        self.total += n

    def _buffer_rows(self) -> int:
        """States counted together: as many as the largest run holds (so memory
        still follows the distinct states), within [_BUFFER_MIN_BYTES,
        _BUFFER_MAX_BYTES]. While states repeat, 1/_ABSORB_RATIO of that: the
        buffer is absorbed into the runs, with no merges to amortize."""
        row_bytes = 8 * self._n_words
        largest = len(self._runs[0]) if self._runs else 0
        if self._repeating:
            largest = -(-largest // _ABSORB_RATIO)
        rows = min(max(largest, _BUFFER_MIN_BYTES // row_bytes), _BUFFER_MAX_BYTES // row_bytes)
        return max(rows, 64)

    # States of 3..8 bytes: one big-endian word each, sorted and run-length
    # counted; large batches straight from the caller's array, small ones
    # gathered in a buffer first.
    def _add_keys(self, packed: np.ndarray) -> None:
        n = packed.shape[0]
        pos = 0
        while pos < n:
            if self._n_pending == 0:
                cap = self._buffer_rows()
                if n - pos >= cap:
                    take = min(n - pos, _CHUNK_ROWS)
                    keys = np.empty(take, np.uint64)
                    _be_words(packed[pos : pos + take], keys)
                    self._count_keys(keys, owned=True)
                    pos += take
                    continue
                if self._pending is None or not cap <= self._pending.shape[0] <= 2 * cap:
                    self._pending = None
                    self._pending = np.empty(cap, np.uint64)
            cap = self._pending.shape[0]
            take = min(cap - self._n_pending, n - pos)
            _be_words(packed[pos : pos + take], self._pending[self._n_pending : self._n_pending + take])
            self._n_pending += take
            if self._n_pending == cap or self._repeats_now():
                self._flush()
            pos += take

    # Longer states: large batches are counted straight from the caller's
    # array and their distinct states copied to the arena; small ones are
    # copied to the end of the arena and counted there in place once enough
    # have arrived.
    def _add_words(self, packed: np.ndarray) -> None:
        n = packed.shape[0]
        pos = 0
        while pos < n:
            cap = max(self._buffer_rows(), self._n_pending)
            if self._n_pending == 0 and n - pos >= cap:
                take = min(n - pos, _CHUNK_ROWS)
                words = _as_words(packed[pos : pos + take], self._n_words)
                hashes, rows, counts = _dedup_words(words, _UNIT)
                start = self._reserve(rows.size)
                refs = np.empty(rows.size, np.int64)
                _keep_rows(words, rows, self._arena, start, refs)
                self._arena_rows += rows.size
                self._push_rows(_Run(hashes[rows], refs, counts), start)
                pos += take
                continue
            if self._n_pending == 0:  # room for the whole buffer at once: one copy, not one per batch
                self._fit_arena(self._arena_rows + cap, slack=1.5)
                self._reserve(cap)
            take = min(cap - self._n_pending, n - pos)
            start = self._reserve(self._n_pending + take) + self._n_pending
            as_bytes = self._arena[start : start + take].view(np.uint8)
            as_bytes[:, : self.n_bytes] = packed[pos : pos + take]
            if self.n_bytes % 8:
                as_bytes[:, self.n_bytes :] = 0
            self._n_pending += take
            if self._n_pending >= cap or self._repeats_now():
                self._flush()
            pos += take

    def _reserve(self, rows: int) -> int:
        """Room for ``rows`` arena rows after the counted ones; returns the first."""
        need = self._arena_rows + rows
        if self._arena is None:
            self._arena = np.empty((max(need, 64), self._n_words), np.uint64)
        elif need > self._arena.shape[0]:
            # Growing by half at least keeps copies amortized (and below the
            # 1.5x at which _fit_arena gives room back); pages of the new
            # array are only backed once written.
            size = max(need + need // 4, self._arena.shape[0] * 3 // 2)
            arena = np.empty((size, self._n_words), np.uint64)
            used = self._arena_rows + self._n_pending
            arena[:used] = self._arena[:used]
            self._arena = arena
        return self._arena_rows

    def _fit_arena(self, need: int, slack: float) -> None:
        """Give back the arena's room beyond ``need`` rows and a quarter when
        it holds more than ``slack`` times that: after the buffer shrank (1.5,
        so a buffer that shrinks and grows back copies rarely), or once
        everything is counted (1). No rows are pending when this runs."""
        arena = self._arena
        rows = max(64, need + need // 4)
        if arena is not None and arena.shape[0] > slack * rows:
            self._arena = np.empty((rows, self._n_words), np.uint64)
            self._arena[: self._arena_rows] = arena[: self._arena_rows]

    def _repeats_now(self) -> bool:
        """Whether the buffer, filling while states were new, now holds mostly
        states the runs know (see _SAMPLE_ROWS)."""
        n = self._n_pending
        if self._repeating or n < self._next_check or not self._runs or _ABSORB_RATIO * n < len(self._runs[0]):
            return False
        self._next_check = n - (-len(self._runs[0]) // _ABSORB_RATIO)
        size = min(n, _SAMPLE_ROWS)
        if self._n_words == 1:
            recent = np.sort(self._pending[n - size : n])
        else:
            end = self._arena_rows + n
            recent = np.sort(_hash_rows(self._arena[end - size : end]))
        self._repeating = self._mostly_known(recent)
        return self._repeating

    def _mostly_known(self, sorted_keys: np.ndarray) -> bool:
        """Whether the runs hold at least half of ``sorted_keys``."""
        known = sum(_count_known(sorted_keys, run.keys) for run in self._runs)
        return 2 * known >= sorted_keys.size

    def _absorbing(self, keys: np.ndarray, final: bool) -> bool:
        """Whether the new run of sorted ``keys`` first gives the runs the
        counts of the states they hold (see _ABSORB_RATIO): always when all
        runs are about to be merged into one (``final``), which copies more
        than any absorbing; else when it holds at least 1/_ABSORB_RATIO as
        many states as the largest run and most of a sample of its keys are
        known (then states repeat: see _buffer_rows)."""
        if not self._runs:
            return False
        if final:
            return True
        if _ABSORB_RATIO * keys.size < len(self._runs[0]):
            return False
        self._repeating = self._mostly_known(keys[:: -(-keys.size // _SAMPLE_ROWS)])
        return self._repeating

    def _flush(self, weights: np.ndarray = None, final: bool = False) -> None:
        """Count the pending states (``weights``: how often each was seen;
        ``final``: all runs are about to be merged into one)."""
        n = self._n_pending
        self._next_check = 0
        if n == 0:
            return
        self._n_pending = 0
        if self._n_words == 1:
            self._count_keys(self._pending[:n], owned=False, final=final)
            return
        start = self._arena_rows
        tail = self._arena[start : start + n]
        hashes, rows, counts = _dedup_words(tail, _UNIT if weights is None else weights)
        keys = hashes[rows]
        refs = np.empty(rows.size, np.int64)
        # Keep one row of each state, in place, in arena order.
        _keep_rows(tail, rows, self._arena, start, refs)
        del tail
        self._arena_rows = start + rows.size
        self._push_rows(_Run(keys, refs, counts), start, final)

    def _count_keys(
        self, keys: np.ndarray, weights: np.ndarray = _UNIT, owned: bool = False, final: bool = False
    ) -> None:
        """Count states that are their own keys: counts of states a run holds
        are added to it in place (see _ABSORB_RATIO), the others become a run.

        Unweighted ``keys`` are sorted in place and overwritten (``owned``: a
        fresh array the run may keep); weighted ones are another counter's run
        (sorted, distinct) and are only read. Sorting, run-length counting and
        absorbing share one scratch array (it ends up holding the counts), so
        a flush of a full buffer needs one buffer's worth of memory beside it
        rather than five."""
        if weights.size:
            absorbing = self._absorbing(keys, final)
            if not absorbing:
                # Keys are never written once in a run, so sharing them is safe; counts are.
                self._append(_Run(keys, None, weights.copy()))
                return
            out, owned = np.empty(keys.size, np.uint64), True
            counts = np.empty(keys.size, np.int64)
        else:
            counts = np.empty(keys.size, np.int64)
            _sort_keys(keys, 0, counts.view(np.uint64))
            out = keys
            absorbing = self._absorbing(keys, final)
        runs = self._runs if absorbing else [_Run(_NO_KEYS, None, _NO_COUNTS)]
        m, distinct = _count_sorted_keys(keys, weights, runs[0].keys, runs[0].counts, out, counts)
        for run in runs[1:]:  # a sample was mostly known: the rest may be in the smaller runs
            if m == 0:
                break
            m, _ = _count_sorted_keys(out[:m], counts[:m], run.keys, run.counts, out, counts)
        if absorbing:
            self._repeating = 2 * m <= distinct
        if m:
            out = _trimmed(out, m) if owned else out[:m].copy()
            self._append(_Run(out, None, _trimmed(counts, m)))

    def _push_rows(self, run: _Run, start: int, final: bool = False) -> None:
        """Add a run of new counts whose states are the last arena rows, from
        ``start`` on. Rows of states the runs absorb are given back: the rest
        move down over them."""
        if self._absorbing(run.keys, final):
            kept = self._absorb(run)
            if len(kept) < len(run):
                self._arena_rows = start + _close_gaps(self._arena, start, len(run), kept.refs)
            run = kept
        if len(run):
            self._append(run)

    def _append(self, run: _Run) -> None:
        """Add a run of states no other run holds, merging runs of similar size."""
        runs = self._runs
        runs.append(run)
        while len(runs) >= 2 and len(runs[-2]) <= 2 * len(runs[-1]):
            last = runs.pop()
            runs[-1] = _merge(runs[-1], last, self._arena)
        self._collect()

    def _absorb(self, run: _Run) -> _Run:
        """Add the counts of the states of ``run`` (of arena rows) that the
        runs hold to them, in place; returns the rest of ``run``."""
        keys = np.empty(len(run), np.uint64)
        refs = np.empty(len(run), np.int64)
        counts = np.empty(len(run), np.int64)
        rest = run
        for held in self._runs:  # a sample was mostly known: what the largest lacks may be in the others
            m = _absorb_kernel(
                held.keys, held.refs, held.counts, rest.keys, rest.refs, rest.counts, self._arena,
                keys, refs, counts,
            )  # fmt: skip
            rest = _Run(keys[:m], refs[:m], counts[:m])
            if m == 0:
                break
        self._repeating = 2 * len(rest) <= len(run)
        if len(rest) == len(run):
            return run  # nothing absorbed: keep the run, drop the copy
        m = len(rest)
        return _Run(_trimmed(keys, m), _trimmed(refs, m), _trimmed(counts, m))

    def _collect(self) -> None:
        """Drop the arena rows of states merged away once they are a third of
        the counted rows (there are no pending rows when this runs)."""
        if self._arena is None:
            return
        live = sum(len(r) for r in self._runs)
        if 3 * (self._arena_rows - live) <= self._arena_rows:
            return
        arena = np.empty((max(64, live + live // 4), self._n_words), np.uint64)
        start = 0
        for i, run in enumerate(self._runs):
            np.take(self._arena, run.refs, axis=0, out=arena[start : start + len(run)])
            self._runs[i] = _Run(run.keys, np.arange(start, start + len(run), dtype=np.int64), run.counts)
            start += len(run)
        self._arena = arena
        self._arena_rows = live

    def _compact(self) -> _Run | None:
        """Count the pending states and merge all runs into one (returned)."""
        self._flush(final=True)
        self._pending = None
        runs = self._runs
        while len(runs) >= 2:
            last = runs.pop()
            runs[-1] = _merge(runs[-1], last, self._arena)
        self._collect()
        self._fit_arena(self._arena_rows, slack=1)
        return runs[0] if runs else None

    def _states(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """``(words (k, n_words), counts (k,), shared)`` of the distinct states
        (more than 8 bytes); ``shared``: the words are a view of the arena."""
        run = self._compact()
        if run is None:
            return np.empty((0, self._n_words), np.uint64), np.empty(0, np.int64), False
        k = len(run)
        if self._arena_rows == k:
            # Every arena row is a state (refs is a permutation): read them in order.
            counts = np.empty(k, np.int64)
            counts[run.refs] = run.counts
            return self._arena[:k], counts, True
        return np.take(self._arena, run.refs, axis=0), run.counts.copy(), False

    def merge(self, other: "StateCounter") -> None:
        """Add the counts of ``other`` (same number of neurons) to this counter."""
        if not isinstance(other, StateCounter):
            raise TypeError(f"merge() takes a StateCounter, got {type(other).__name__}")
        if other.n_neurons != self.n_neurons:
            raise ValueError(
                f"cannot merge counts of {other.n_neurons} neurons into counts of {self.n_neurons}"
            )
        total = other.total
        if self._small:
            self._direct += other._direct
        else:
            run = other._compact()
            if run is not None:
                if self._n_words == 1:
                    self._count_keys(run.keys, run.counts)
                else:
                    k = len(run)
                    # Keys are never written once in a run, so they are shared; counts are copied.
                    # When every arena row of ``other`` is a state (always after unpickling), its
                    # rows are copied as they lie, else gathered in run order first.
                    in_place = other._arena_rows == k
                    words = other._arena[:k] if in_place else np.take(other._arena, run.refs, axis=0)
                    counts = run.counts.copy()
                    self._flush()
                    start = self._reserve(k)
                    self._arena[start : start + k] = words
                    self._arena_rows += k
                    refs = start + run.refs if in_place else np.arange(start, start + k, dtype=np.int64)
                    self._push_rows(_Run(run.keys, refs, counts), start)
        self.total += total

    def result(self, sort: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(state_ids uint8 (k, n_bytes), counts int64 (k,))``: row ``i`` of
        ``state_ids`` was seen ``counts[i]`` times; new arrays, each state once.

        Args:
            sort: if True, the states come in lexicographic byte order (the
                order of ``np.unique(packed, axis=0)``). By default the order
                is whatever is cheapest: deterministic for the same data, but
                unspecified (it happens to be byte order up to 64 neurons).
        """
        if self._small:
            values = np.flatnonzero(self._direct)
            ids = values.astype(">u2").view(np.uint8).reshape(-1, 2)[:, 2 - self.n_bytes :]
            return np.ascontiguousarray(ids), self._direct[values]
        if self._n_words == 1:
            run = self._compact()
            if run is None:
                return np.empty((0, self.n_bytes), np.uint8), np.empty(0, np.int64)
            ids = np.empty((len(run), self.n_bytes), np.uint8)
            _be_bytes(run.keys, ids)
            return ids, run.counts.copy()
        words, counts, shared = self._states()
        if sort:
            # Big-endian words compare like the bytes they hold.
            order = _lex_order(words.byteswap())
            return words.view(np.uint8)[order, : self.n_bytes], counts[order]
        ids = words.view(np.uint8)[:, : self.n_bytes]
        return (ids.copy() if shared or not ids.flags.c_contiguous else ids), counts

    def counts(self) -> np.ndarray:
        """The counts of :meth:`result` (same order) without building the
        states: all that entropy and efficiency need."""
        if self._small:
            return self._direct[np.flatnonzero(self._direct)]
        run = self._compact()
        if run is None:
            return np.empty(0, np.int64)
        if self._n_words > 1 and self._arena_rows == len(run):
            counts = np.empty(len(run), np.int64)  # arena order, as _states() gives
            counts[run.refs] = run.counts
            return counts
        return run.counts.copy()

    def __getstate__(self) -> dict:
        # Sharded runs ship counters between processes: each distinct state
        # once, as its packed bytes, with counts in the narrowest dtype that
        # holds them; hashes and order are rebuilt when loaded.
        state = self.__dict__.copy()
        if self._small:
            seen = np.flatnonzero(self._direct)
            state["_direct"] = (self._direct.size, seen, _narrowest(self._direct[seen]))
            return state
        state.update(_pending=None, _n_pending=0, _arena=None, _arena_rows=0)
        if self._n_words == 1:
            ids, counts = self.result()  # in key order already
        else:
            # In the run's (hash, words) order, so loading rebuilds the run
            # without sorting (it checks the order and sorts only if it is off).
            run = self._compact()
            if run is None:
                ids, counts = np.empty((0, self.n_bytes), np.uint8), np.empty(0, np.int64)
            else:
                ids = np.take(self._arena, run.refs, axis=0).view(np.uint8)[:, : self.n_bytes]
                counts = run.counts
        state["_runs"] = (np.ascontiguousarray(ids), _narrowest(counts))
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self._small:
            size, seen, counts = state["_direct"]
            self._direct = np.zeros(size, np.int64)
            self._direct[seen] = counts
            return
        # How the buffer flows is not part of the counts (and pickles of older
        # versions lack it): start afresh.
        self._repeating, self._next_check = False, 0
        ids, counts = state["_runs"]
        counts = counts.astype(np.int64)
        self._runs = []
        if ids.shape[0] == 0:
            return
        if self._n_words == 1:
            # result() lists short states in byte order, so the keys are sorted.
            keys = np.empty(ids.shape[0], np.uint64)
            _be_words(ids, keys)
            self._runs = [_Run(keys, None, counts)]
        else:
            words = _as_words(ids, self._n_words)
            self._reserve(words.shape[0])
            self._arena[: words.shape[0]] = words
            hashes = _hash_rows(self._arena[: words.shape[0]])
            if _in_run_order(hashes, self._arena):
                self._arena_rows = words.shape[0]
                self._runs = [_Run(hashes, np.arange(words.shape[0], dtype=np.int64), counts)]
            else:  # not written by __getstate__ above: count the states afresh
                self._n_pending = words.shape[0]
                self._flush(counts)


def _narrowest(counts: np.ndarray) -> np.ndarray:
    """``counts`` in the smallest unsigned dtype that holds them (a pickle is mostly counts of 1)."""
    top = int(counts.max()) if counts.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return counts.astype(dtype)
    return counts


# Groups of rows equal in one column that are sorted by the next column with
# numpy (larger) or by a merge sort over the remaining columns (smaller).
_LEX_GROUP = 4096


@numba.njit(cache=True, nogil=True)
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


def _lex_order(big: np.ndarray, col: int = 0, rows: np.ndarray | None = None) -> np.ndarray:
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
        order[lo:hi] = _lex_order(big, col + 1, order[lo:hi])
    return order


def _dedup_words(words: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct rows of ``words`` (native uint64 (n, n_words)), each row
    weighted (empty ``weights``: once each): ``(hashes of all rows, row index
    of each distinct state, its count)``, the states in (hash, words) order."""
    n = words.shape[0]
    hashes = _hash_rows(words)
    bits = max(1, int(n - 1).bit_length())
    tagged = np.empty(n, np.uint64)
    _tag(hashes, bits, tagged)
    _sort_keys(tagged, bits)  # the index bits are in order already
    rows = np.empty(n, np.int64)
    counts = np.empty(n, np.int64)
    k = _dedup_tagged(tagged, bits, hashes, words, weights, rows, counts, _GROUP_REPS)
    return hashes, rows[:k], _trimmed(counts, k)


