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
_PARALLEL_MIN_BYTES = 1 << 20
_N_THREADS = max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8))
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_N_THREADS, thread_name_prefix="tensorstate-pack")
        return _pool


@numba.njit(cache=True, nogil=True)
def _pack_flat_by8(flat, lo, hi, out):
    """Channels-last contiguous data with C a multiple of 8: byte i from values 8i..8i+7."""
    for i in range(out.size):
        byte = np.uint32(0)
        base = 8 * i
        for j in range(8):
            v = flat[base + j]
            byte |= np.uint32((v > lo) & (v <= hi)) << j
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
                    byte |= np.uint32((v > lo) & (v <= hi)) << j
                out[row, k] = byte
            if full * 8 < n_c:
                byte = np.uint32(0)
                for c in range(full * 8, n_c):
                    v = x[a, b, c]
                    byte |= np.uint32((v > lo) & (v <= hi)) << (c - 8 * full)
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
            np.uint32((s0[p] > lo) & (s0[p] <= hi))
            | np.uint32((s1[p] > lo) & (s1[p] <= hi)) << 1
            | np.uint32((s2[p] > lo) & (s2[p] <= hi)) << 2
            | np.uint32((s3[p] > lo) & (s3[p] <= hi)) << 3
            | np.uint32((s4[p] > lo) & (s4[p] <= hi)) << 4
            | np.uint32((s5[p] > lo) & (s5[p] <= hi)) << 5
            | np.uint32((s6[p] > lo) & (s6[p] <= hi)) << 6
            | np.uint32((s7[p] > lo) & (s7[p] <= hi)) << 7
        )


@numba.njit(cache=True, nogil=True)
def _pack_cols(x, lo, hi, out):
    """``x`` is ``(a, C, b)``: the positions are the fastest axis (channels-first).

    Eight channel rows are read side by side along a block of positions, so
    every load streams through memory; the bytes of a block are gathered in a
    small buffer and then written into the output rows.
    """
    n_a, n_c, n_b = x.shape
    n_bytes = out.shape[1]
    full = n_c // 8
    width_max = min(4096, max(256, 262144 // n_bytes))
    block = np.zeros((n_bytes, width_max), np.uint8)
    for a in range(n_a):
        for b0 in range(0, n_b, width_max):
            width = min(width_max, n_b - b0)
            for k in range(full):
                _byte_of_eight(x, a, 8 * k, b0, width, lo, hi, block[k])
            if full < n_bytes:
                tail = block[full]
                tail[:width] = 0
                for c in range(8 * full, n_c):
                    src = x[a, c, b0 : b0 + width]
                    for p in range(width):
                        tail[p] |= np.uint8((src[p] > lo) & (src[p] <= hi)) << (c - 8 * full)
            first = a * n_b + b0
            for p in range(width):
                for k in range(n_bytes):
                    out[first + p, k] = block[k, p]


def _comparable(x: np.ndarray) -> tuple[np.ndarray, object, object]:
    """A view of ``x`` and bounds ``(lo, hi)`` such that a neuron fires iff ``lo < v <= hi``.

    float32/64 compare as floats (NaN fails both tests). float16, which numba
    cannot compare, is viewed as int16: positive finite values and +inf have
    bit patterns in ``(0, 0x7C00]``, while negatives, -0.0 and every NaN fall
    outside. bool is viewed as uint8 so that any non-zero byte fires.
    """
    if x.dtype == np.float32 or x.dtype == np.float64:
        return x, x.dtype.type(0), x.dtype.type(np.inf)
    if x.dtype == np.float16:
        return x.view(np.int16), np.int16(0), np.int16(0x7C00)
    if x.dtype == np.bool_:
        return x.view(np.uint8), np.uint8(0), np.uint8(255)
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


def _run_block(view: np.ndarray, lo, hi, out: np.ndarray) -> None:
    if 0 < abs(view.strides[1]) < abs(view.strides[2]):
        _pack_cols(view.transpose(0, 2, 1), lo, hi, out)
    elif view.flags.c_contiguous and view.shape[2] % 8 == 0:
        _pack_flat_by8(view.reshape(-1), lo, hi, out.reshape(-1))
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

@numba.njit(cache=True, nogil=True)
def _hash_row(words, i):
    h = np.uint64(0x9E3779B97F4A7C15)
    for w in range(words.shape[1]):
        h ^= words[i, w]
        h *= np.uint64(0xFF51AFD7ED558CCD)
        h ^= h >> np.uint64(32)
    return h


@numba.njit(cache=True, nogil=True)
def _count_into(words, weights, keys, counts, hashes, table, n_keys):
    """Add rows of ``words`` (each with a weight) to an open-addressing hash table.

    A table slot holds ``key index + 1`` in its low 32 bits and the high half
    of the key's hash above, so most probes are settled without touching the
    key store. Stops early when the key store or the table is full; returns
    ``(rows consumed, keys in use)`` so the caller can grow and resume.
    """
    mask = np.uint64(table.size - 1)
    cap = keys.shape[0]
    n_words = words.shape[1]
    for i in range(words.shape[0]):
        h = _hash_row(words, i)
        tag = np.int64(h >> np.uint64(32)) << 32
        slot = h & mask
        while True:
            entry = table[slot]
            if entry == 0:
                if n_keys >= cap or 2 * (n_keys + 1) > table.size:
                    return i, n_keys
                for w in range(n_words):
                    keys[n_keys, w] = words[i, w]
                hashes[n_keys] = h
                counts[n_keys] = weights[i]
                n_keys += 1
                table[slot] = tag | n_keys
                break
            if (entry & np.int64(0xFFFFFFFF00000000)) == tag:
                idx = (entry & 0xFFFFFFFF) - 1
                same = True
                for w in range(n_words):
                    if keys[idx, w] != words[i, w]:
                        same = False
                        break
                if same:
                    counts[idx] += weights[i]
                    break
            slot = (slot + np.uint64(1)) & mask
    return words.shape[0], n_keys


@numba.njit(cache=True, nogil=True)
def _rebuild_table(hashes, n_keys, table):
    mask = np.uint64(table.size - 1)
    table[:] = 0
    for idx in range(n_keys):
        h = hashes[idx]
        slot = h & mask
        while table[slot] != 0:
            slot = (slot + np.uint64(1)) & mask
        table[slot] = (np.int64(h >> np.uint64(32)) << 32) | (idx + 1)


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
def _row_less(keys, a, b):
    for w in range(keys.shape[1]):
        if keys[a, w] != keys[b, w]:
            return keys[a, w] < keys[b, w]
    return False


@numba.njit(cache=True, nogil=True)
def _sorted_order(keys, n_keys):
    """Indices of the first ``n_keys`` rows in lexicographic order (bottom-up merge sort)."""
    order = np.arange(n_keys)
    buf = np.empty(n_keys, np.int64)
    width = 1
    while width < n_keys:
        for lo in range(0, n_keys, 2 * width):
            mid = min(lo + width, n_keys)
            hi = min(lo + 2 * width, n_keys)
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                if _row_less(keys, order[j], order[i]):
                    buf[k] = order[j]
                    j += 1
                else:
                    buf[k] = order[i]
                    i += 1
                k += 1
            while i < mid:
                buf[k] = order[i]
                i += 1
                k += 1
            while j < hi:
                buf[k] = order[j]
                j += 1
                k += 1
        order, buf = buf, order
        width *= 2
    return order


def _as_words(packed: np.ndarray, n_words: int) -> np.ndarray:
    """Rows of ``packed`` as native uint64 words, zero padded (no copy when aligned)."""
    n, width = packed.shape
    if width == 8 * n_words and packed.flags.c_contiguous:
        padded = packed
    else:
        padded = np.zeros((n, 8 * n_words), np.uint8)
        padded[:, :width] = packed
    return padded.view(np.uint64)


class StateCounter:
    """Streaming, mergeable counts of packed states.

    Memory grows with the number of distinct states, not with the number of
    states added. ``result()`` gives the states in lexicographic byte order,
    the order of ``np.unique(packed, axis=0)``.
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
        else:
            self._n_words = (self.n_bytes + 7) // 8
            self._n_keys = 0
            self._keys = np.empty((1024, self._n_words), np.uint64)
            self._counts = np.empty(1024, np.int64)
            self._hashes = np.empty(1024, np.uint64)
            self._table = np.zeros(2048, np.int64)

    @property
    def n_distinct(self) -> int:
        """Number of distinct states seen so far."""
        if self._small:
            return int(np.count_nonzero(self._direct))
        return self._n_keys

    def add(self, packed: np.ndarray) -> None:
        """Count a batch of packed states (``uint8 (n, ceil(C/8))``)."""
        packed = _check_packed(packed, self.n_neurons, "StateCounter.add()")
        if packed.shape[0] == 0:
            return
        if self._small:
            _count_small(packed, self._direct)
        else:
            words = _as_words(packed, self._n_words)
            self._add_words(words, np.ones(words.shape[0], np.int64))
        self.total += packed.shape[0]

    def _add_words(self, words: np.ndarray, weights: np.ndarray) -> None:
        start = 0
        while start < words.shape[0]:
            done, self._n_keys = _count_into(
                words[start:], weights[start:], self._keys, self._counts,
                self._hashes, self._table, self._n_keys,
            )
            start += done
            if start < words.shape[0]:
                self._grow()

    def _grow(self) -> None:
        if self._n_keys >= self._keys.shape[0]:
            cap = 2 * self._keys.shape[0]
            self._keys = _resized(self._keys, cap)
            self._counts = _resized(self._counts, cap)
            self._hashes = _resized(self._hashes, cap)
        if 2 * (self._n_keys + 1) > self._table.size:
            self._table = np.empty(2 * self._table.size, np.int64)
            _rebuild_table(self._hashes, self._n_keys, self._table)

    def merge(self, other: "StateCounter") -> None:
        """Add the counts of ``other`` (same number of neurons) to this counter."""
        if not isinstance(other, StateCounter):
            raise TypeError(f"merge() takes a StateCounter, got {type(other).__name__}")
        if other.n_neurons != self.n_neurons:
            raise ValueError(
                f"cannot merge counts of {other.n_neurons} neurons into counts of {self.n_neurons}"
            )
        if self._small:
            self._direct += other._direct
        else:
            n = other._n_keys
            self._add_words(other._keys[:n], other._counts[:n])
        self.total += other.total

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(state_ids uint8 (k, n_bytes), counts int64 (k,))`` in lexicographic byte order."""
        if self._small:
            values = np.flatnonzero(self._direct)
            ids = values.astype(">u2").view(np.uint8).reshape(-1, 2)[:, 2 - self.n_bytes :]
            return np.ascontiguousarray(ids), self._direct[values]
        keys = self._keys[: self._n_keys]
        # Words read big-endian compare like the bytes they hold.
        order = _sorted_order(keys.byteswap(), self._n_keys)
        ids = keys[order].view(np.uint8)
        return np.ascontiguousarray(ids[:, : self.n_bytes]), self._counts[order]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if not self._small:
            n = self._n_keys
            state.update(_keys=self._keys[:n].copy(), _counts=self._counts[:n].copy(),
                         _hashes=self._hashes[:n].copy(), _table=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if not self._small:
            cap = max(1024, 1 << int(np.ceil(np.log2(max(self._n_keys, 1) + 1))))
            self._keys = _resized(self._keys, cap)
            self._counts = _resized(self._counts, cap)
            self._hashes = _resized(self._hashes, cap)
            self._table = np.empty(2 * cap, np.int64)
            _rebuild_table(self._hashes, self._n_keys, self._table)


def _resized(a: np.ndarray, rows: int) -> np.ndarray:
    out = np.empty((rows, *a.shape[1:]), a.dtype)
    out[: min(rows, a.shape[0])] = a[:rows]
    return out
