"""Quantize tensors and bit-pack their states; unpack; check packed states.

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

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .._system import usable_cpus
from ..errors import OptionError, OptionTypeError, PackedStateError
from .jit import kernel
from .unaligned import load8, store8

__all__ = ["check_packed", "n_bytes_for", "pack", "unpack"]


def n_bytes_for(n_neurons: int) -> int:
    """Bytes of one packed state of ``n_neurons`` neurons."""
    return (n_neurons + 7) // 8


# Inputs smaller than this are packed on the calling thread; handing parts
# to threads would cost more than it saves (on the 2-core development VM,
# inputs of 4-9 MiB packed faster on one thread; 18 MiB 1.4x faster on two).
_PARALLEL_MIN_BYTES = 1 << 24
_N_THREADS = min(usable_cpus(), 8)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_N_THREADS, thread_name_prefix="tensorstate-pack")
        return _pool


@kernel(inline="always")
def _fires(v, lo, hi):
    """Whether a neuron of value ``v`` fires: ``v > lo``, and ``v <= hi`` unless
    ``hi`` is None (the check is then compiled away)."""
    if hi is None:
        return v > lo
    return (v > lo) & (v <= hi)


@kernel
def _pack_flat_by8(flat, lo, hi, out):
    """Channels-last contiguous data with C a multiple of 8: byte i of ``out``
    (1-d, contiguous) from values 8i..8i+7.

    Eight bytes from 64 values at a time, stored as one uint64 from the first
    8-byte aligned byte of ``out`` on. The 64-value inner loop vectorizes with
    wide loads and shuffles; narrower groups (16 values to a uint16) were
    compiled to gathers on some CPUs, several times slower.
    """
    n_out = out.size
    head = min((-out.ctypes.data) % 8, n_out)
    out64 = out[head : head + 8 * ((n_out - head) // 8)].view(np.uint64)
    for i in range(head):
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


@kernel
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


@kernel(inline="always")
def _eight_rows(r0, r1, r2, r3, r4, r5, r6, r7, lo, hi, dst):
    """``dst[p]``: bit ``j`` fires iff ``rj[p]`` does, for every ``p`` of
    ``dst`` (eight channel rows read side by side, each value once)."""
    for p in range(dst.size):
        dst[p] = (
            np.uint8(_fires(r0[p], lo, hi))
            | np.uint8(_fires(r1[p], lo, hi)) << 1
            | np.uint8(_fires(r2[p], lo, hi)) << 2
            | np.uint8(_fires(r3[p], lo, hi)) << 3
            | np.uint8(_fires(r4[p], lo, hi)) << 4
            | np.uint8(_fires(r5[p], lo, hi)) << 5
            | np.uint8(_fires(r6[p], lo, hi)) << 6
            | np.uint8(_fires(r7[p], lo, hi)) << 7
        )


@kernel
def _byte_of_eight(x, a, c, b0, width, lo, hi, dst):
    """Bits of channels ``c..c+7`` at positions ``b0..b0+width`` of ``x[a]`` into ``dst``."""
    _eight_rows(
        x[a, c, b0 : b0 + width], x[a, c + 1, b0 : b0 + width], x[a, c + 2, b0 : b0 + width],
        x[a, c + 3, b0 : b0 + width], x[a, c + 4, b0 : b0 + width], x[a, c + 5, b0 : b0 + width],
        x[a, c + 6, b0 : b0 + width], x[a, c + 7, b0 : b0 + width], lo, hi, dst[:width],
    )  # fmt: skip


@kernel
def _bytes_of_rows(x, a, b0, groups, width, lo, hi, block):
    """Byte ``k`` (channels ``8k..8k+7``) of positions ``b0..b0+width`` of
    ``x[a]`` into ``block[k]``, for ``k < groups``.

    Each channel row is read in one pass and OR-ed into its bit of
    ``block[k]`` (at most 4 KiB, in L1), so a contiguous sample streams
    through memory in order: faster than reading the eight rows side by
    side when rows are short (small feature maps), where eight short
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


@kernel(inline="always")
def _put8(out, row, col, word):
    """The 8 bytes of ``word`` (little-endian) into ``out[row, col:col+8]``."""
    for i in range(8):
        out[row, col + i] = np.uint8(word >> np.uint64(8 * i))


@kernel(inline="always")
def _transpose8x8(r0, r1, r2, r3, r4, r5, r6, r7):
    """Transpose the 8x8 bytes of eight uint64 words: byte ``i`` of word ``j``
    in becomes byte ``j`` of word ``i`` out (three rounds of swaps of 8-, 16-
    and 32-bit blocks)."""
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
    return r0, r1, r2, r3, r4, r5, r6, r7


@kernel
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
    flat = out.reshape(-1)
    zero = np.uint64(0)
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
                if n_kw == 0 and (row + 7) * n_bytes + 8 <= flat.size:
                    # Fewer than 8 bytes a state: an 8x8 transpose with the rows past
                    # them empty; each row's 8 bytes spill into the next row, whose own
                    # store comes after (the last row's spill: beyond this group,
                    # stored later, as the room check ensures).
                    r = _transpose8x8(
                        words[0, pw], words[1, pw],
                        words[2, pw] if n_bytes > 2 else zero, words[3, pw] if n_bytes > 3 else zero,
                        words[4, pw] if n_bytes > 4 else zero, words[5, pw] if n_bytes > 5 else zero,
                        words[6, pw] if n_bytes > 6 else zero, zero,
                    )  # fmt: skip
                    for i in range(8):
                        store8(flat, (row + i) * n_bytes, r[i])
                    continue
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
                    r0, r1, r2, r3, r4, r5, r6, r7 = _transpose8x8(r0, r1, r2, r3, r4, r5, r6, r7)
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


# Bytes of fire flags that the small-map kernel makes at a time (in L1 cache).
_MAP_CHUNK = 16384


@kernel(inline="always")
def _group_word(lanes, at, span, i, k, n_groups, n_bytes, last_word):
    """The lanes of group ``k + i`` at ``at + i * span`` as a word, the last
    group of a state masked with ``last_word``; 0 past the ``n_groups``."""
    if i >= n_groups:
        return np.uint64(0)
    word = load8(lanes, at + i * span)
    return word & last_word if k + i == n_bytes - 1 else word


@kernel(inline="always")
def _emit_groups(lanes, n_samples, per, span, k0, k1, n_c, n_b, out, row0):
    """Bytes ``k0..k1`` of the states of ``n_samples`` consecutive samples
    (``n_b`` states each, from row ``row0`` on) into ``out`` (the output rows
    flattened): byte ``k`` of position ``p`` of sample ``s`` is
    ``lanes[s * per + (k - k0) * span + p]`` (``span >= n_b``).

    Eight groups at a time, the bytes of eight positions of each are read as
    one word and the 8x8 bytes transposed, so that each position gets its
    eight bytes in one store. With fewer than eight positions the upper bytes
    of the words are junk (never stored); with more, the last eight positions
    overlap the ones before them (stored twice, the same), and so do the
    last eight groups when their number is not a multiple of 8. With fewer
    than eight groups (a state of fewer than 8 bytes) and eight positions or
    more, each store runs past its row into the following ones, which are
    stored after it (only where the output has room). Otherwise the bytes go
    one by one (unsigned indices: numba checks signed ones for being
    negative), faster than a transpose of mostly empty words for maps of
    fewer than eight positions."""
    n_bytes = (n_c + 7) // 8
    n_groups = k1 - k0
    valid = min(8, n_b)
    # The last group of a sample with C % 8 channels has bits of the next
    # sample's channels (or junk) above them: masked off.
    last = np.uint8((1 << (n_c - 8 * (n_bytes - 1))) - 1)
    last_word = np.uint64(last) * np.uint64(0x0101010101010101)
    for s in range(n_samples):
        start = s * per
        row = row0 + s * n_b
        if n_bytes == 1 and row + n_b + 8 <= out.size:
            # One byte per state: the lanes are the states, in order.
            for q in range(0, n_b, 8):
                p0 = max(0, min(q, n_b - 8))
                store8(out, row + p0, load8(lanes, start + p0) & last_word)
        elif n_groups >= 8 or (n_b >= 8 and (row + n_b - 1) * n_bytes + 8 <= out.size):
            for kb in range(0, n_groups, 8):
                k = k0 + min(kb, n_groups - 8) if n_groups >= 8 else k0
                base = start + (k - k0) * span
                for q in range(0, n_b, 8):
                    p0 = max(0, min(q, n_b - 8))
                    at = base + p0
                    words = _transpose8x8(
                        _group_word(lanes, at, span, 0, k, n_groups, n_bytes, last_word),
                        _group_word(lanes, at, span, 1, k, n_groups, n_bytes, last_word),
                        _group_word(lanes, at, span, 2, k, n_groups, n_bytes, last_word),
                        _group_word(lanes, at, span, 3, k, n_groups, n_bytes, last_word),
                        _group_word(lanes, at, span, 4, k, n_groups, n_bytes, last_word),
                        _group_word(lanes, at, span, 5, k, n_groups, n_bytes, last_word),
                        _group_word(lanes, at, span, 6, k, n_groups, n_bytes, last_word),
                        _group_word(lanes, at, span, 7, k, n_groups, n_bytes, last_word),
                    )
                    first = (row + p0) * n_bytes + k
                    for p in range(valid):
                        store8(out, first + p * n_bytes, words[p])
        else:
            for g in range(k0, k1):
                at = start + (g - k0) * span
                mask = last if g == n_bytes - 1 else np.uint8(0xFF)
                for p in range(n_b):
                    out[np.uint64((row + p) * n_bytes + g)] = lanes[np.uint64(at + p)] & mask


@kernel(inline="always")
def _lanes_of_groups(src, first_sample, n_samples, per, k0, k1, n_c, n_b, lo, hi, lanes):
    """The lanes :func:`_emit_groups` reads, straight from the values (samples
    of ``per`` values in ``src``): byte ``k`` (channels ``8k..8k+7``) of
    position ``p`` of sample ``first_sample + s`` into
    ``lanes[(s * (k1 - k0) + k - k0) * n_b + p]``, for groups ``k0..k1``, with
    no gaps; each group's eight channel rows are read side by side, every
    value once."""
    for s in range(n_samples):
        for k in range(k0, k1):
            at = (s * (k1 - k0) + k - k0) * n_b
            first = (first_sample + s) * per + 8 * k * n_b
            dst = lanes[at : at + n_b]
            if 8 * k + 8 <= n_c:
                r = src[first : first + 8 * n_b]
                _eight_rows(
                    r[:n_b], r[n_b : 2 * n_b], r[2 * n_b : 3 * n_b], r[3 * n_b : 4 * n_b],
                    r[4 * n_b : 5 * n_b], r[5 * n_b : 6 * n_b], r[6 * n_b : 7 * n_b], r[7 * n_b :], lo, hi, dst,
                )  # fmt: skip
            else:  # the last group of C % 8 channels
                dst[:] = 0
                for j in range(n_c - 8 * k):
                    row = src[first + j * n_b : first + (j + 1) * n_b]
                    for p in range(n_b):
                        dst[p] |= np.uint8(_fires(row[p], lo, hi)) << j


# Maps of at least this many positions make their lanes straight from the
# values (:func:`_lanes_of_groups`); smaller ones through fire flags, where
# loops along a map's short rows cost more than making 8 times the lanes.
_DIRECT_LANES_MIN = 64


@kernel
def _pack_maps(x, n_c, n_b, lo, hi, out):
    """``x`` is ``(runs, m * C * b)``: each row holds ``m`` whole samples of
    ``C`` channels of ``b`` positions (channels-first), one after the other;
    ``out`` is the output rows flattened.

    For small feature maps, where a channel row of ``b`` values is too short
    for a loop along it to pay. A chunk of values (several whole samples, or
    some groups of channels of one; its flags fit in L1 cache) is turned into
    fire flags, one byte each, in one long loop; then every flag position
    ``i`` gets the byte ``lanes[i]`` whose bit ``j`` is ``flags[i + j * b]``,
    also in one long loop of wide loads and shifts (8 times more bytes than
    needed, as only the first ``b`` of every ``8 * b`` are state bytes, but
    far cheaper than short loops); :func:`_emit_groups` moves the state
    bytes to their rows. Flags past the chunk (stale) are read into lanes
    that are never stored, or into the bits of channels beyond ``C``, which
    :func:`_emit_groups` masks. Maps of ``_DIRECT_LANES_MIN`` positions or
    more have rows long enough for loops along them to pay: their lanes are
    made straight from the values, with no flags (:func:`_lanes_of_groups`)."""
    n_runs, run = x.shape
    per = n_c * n_b
    n_bytes = (n_c + 7) // 8
    samples = run // per
    size = max(_MAP_CHUNK, 64 * n_b)
    # A chunk is several whole samples, or at least eight groups of channels
    # of one (the last chunk overlapping the one before it, if need be).
    sample_step = max(1, _MAP_CHUNK // per)
    group_step = n_bytes if per <= _MAP_CHUNK else max(8, _MAP_CHUNK // (8 * n_b))
    direct = n_b >= _DIRECT_LANES_MIN
    flags = np.zeros(0 if direct else size + 8 * n_b + 8, np.uint8)
    lanes = np.zeros((sample_step * min(n_bytes, group_step) * n_b if direct else size) + 8, np.uint8)
    # flags seen from each of the 8 rows of a group on: plain indices in the
    # loop below (an offset inside the index would defeat vectorization).
    rows0, rows1, rows2, rows3 = flags, flags[n_b:], flags[2 * n_b :], flags[3 * n_b :]
    rows4, rows5, rows6, rows7 = flags[4 * n_b :], flags[5 * n_b :], flags[6 * n_b :], flags[7 * n_b :]
    for r in range(n_runs):
        src = x[r]
        for s0 in range(0, samples, sample_step):
            s1 = min(samples, s0 + sample_step)
            for kc in range(0, n_bytes, group_step):
                k1 = min(n_bytes, kc + group_step)
                k0 = max(0, min(kc, k1 - 8))
                if direct:
                    _lanes_of_groups(src, s0, s1 - s0, per, k0, k1, n_c, n_b, lo, hi, lanes)
                    row = (r * samples + s0) * n_b
                    _emit_groups(lanes, s1 - s0, (k1 - k0) * n_b, n_b, k0, k1, n_c, n_b, out, row)
                    continue
                body = src[s0 * per + 8 * k0 * n_b : (s1 - 1) * per + min(8 * k1, n_c) * n_b]
                m = body.size
                for i in range(m):
                    flags[i] = _fires(body[i], lo, hi)
                for i in range(m):
                    lanes[i] = (
                        rows0[i]
                        | rows1[i] << 1
                        | rows2[i] << 2
                        | rows3[i] << 3
                        | rows4[i] << 4
                        | rows5[i] << 5
                        | rows6[i] << 6
                        | rows7[i] << 7
                    )
                _emit_groups(lanes, s1 - s0, per, 8 * n_b, k0, k1, n_c, n_b, out, (r * samples + s0) * n_b)


# Per dtype: what to view the values as (None: as they are) and the bounds
# (lo, hi) of a firing value, as _comparable describes them.
_BOUNDS = {
    np.dtype(np.float32): (None, np.float32(0), None),
    np.dtype(np.float64): (None, np.float64(0), None),
    np.dtype(np.float16): (np.int16, np.int16(0), np.int16(0x7C00)),
    np.dtype(np.bool_): (np.uint8, np.uint8(0), None),
}


def _comparable(x: np.ndarray) -> tuple[np.ndarray, object, object]:
    """A view of ``x`` and bounds ``(lo, hi)`` such that a neuron fires iff
    ``lo < v`` and, unless ``hi`` is None, ``v <= hi``.

    float32/64 compare as floats (NaN fails the test, +inf passes). float16,
    which numba cannot compare, is viewed as int16: positive finite values and
    +inf have bit patterns in ``(0, 0x7C00]``, while negatives, -0.0 and every
    NaN fall outside. bool is viewed as uint8 so that any non-zero byte fires.
    """
    bounds = _BOUNDS.get(x.dtype)
    if bounds is not None:
        view_as, lo, hi = bounds
        return (x if view_as is None else x.view(view_as)), lo, hi
    raise OptionTypeError(
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
    shape, _ = _merge_axes(x.shape[:-1], x.strides[:-1])
    while len(shape) < 2:
        shape.insert(0, 1)
    shape.append(x.shape[-1])
    # reshape makes the view in a fraction of as_strided's time (which costs
    # more than packing a small batch): it copies only axes that do not
    # merge, and these do.
    view = x.reshape(shape)
    return [view[idx] for idx in np.ndindex(*shape[:-3])] if len(shape) > 3 else [view]


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


# Channels-first blocks with at most this many positions per sample (16x16)
# go to _pack_maps, faster there; so do larger feature maps with states of
# two bytes or more (1.1-1.8x _pack_cols' speed, e.g. 96 channels of 24x24).
# States of one byte of larger maps go to _pack_cols, which stores them
# straight from the values (1.2-1.7x _pack_maps' speed).
_SMALL_MAP_MAX = 256


def _maps_serve(n_c: int, n_b: int) -> bool:
    """Whether :func:`_pack_maps` packs channels-first samples of ``n_c``
    channels of ``n_b`` positions (else :func:`_pack_cols`)."""
    return n_b <= _SMALL_MAP_MAX or n_c > 8


def _sample_runs(view: np.ndarray) -> np.ndarray | None:
    """``view`` (``(a, b, C)``, channels-first in memory) as ``(runs, m * C * b)``
    rows of whole samples for :func:`_pack_maps`, or None when a sample's
    values are not equally spaced (channel stride = b * position stride)."""
    n_a, n_b, n_c = view.shape
    s_a, s_b, s_c = view.strides
    if not _maps_serve(n_c, n_b) or s_c != n_b * s_b:
        return None
    # (a, C, b) with the last two axes mergeable: reshape makes views, no copies.
    samples = view.transpose(0, 2, 1).reshape(n_a, n_c * n_b)
    return samples.reshape(1, -1) if s_a == n_c * n_b * s_b else samples


def _run_block(view: np.ndarray, lo, hi, out: np.ndarray) -> None:
    """Pack one ``(a, b, C)`` block into its output rows with the kernel for
    its layout: channels-first with small maps, channels-first, contiguous
    channels-last with C a multiple of 8, or any other strides."""
    channels_first = 0 < abs(view.strides[1]) < abs(view.strides[2])
    runs = _sample_runs(view) if channels_first and out.flags.c_contiguous else None
    if runs is not None:
        _pack_maps(runs, view.shape[2], view.shape[1], lo, hi, out.reshape(-1))
    elif channels_first:
        wide = out.shape[1] % 8 == 0 and out.flags.c_contiguous and out.ctypes.data % 8 == 0
        out64 = out.view(np.uint64) if wide else _NO_WORDS
        _pack_cols(view.transpose(0, 2, 1), lo, hi, out, out64)
    elif view.flags.c_contiguous and view.shape[2] % 8 == 0:
        _pack_flat_by8(view.reshape(-1), lo, hi, out.reshape(-1))
    else:
        _pack_rows(view, lo, hi, out)


# Plans for C-contiguous inputs packed on the calling thread, by (dtype, shape,
# channel axis as given); None: that layout takes the general path. Bounded,
# since inputs of varying shapes (sequences of any length) would grow it.
_PLANS: dict[tuple, _Plan | None] = {}
_MAX_PLANS = 512


class _Plan:
    """How to pack every C-contiguous array of one dtype and shape on one
    channel axis: its flat values reshaped for one kernel, with no per-call
    layout analysis (for the small tensors of a batch, that analysis cost
    more than packing them). The layout is ``(A, C, B)``: ``A`` leading
    positions, ``C`` channels, ``B`` trailing positions."""

    __slots__ = ("view_as", "lo", "hi", "kind", "shape", "n_c", "n_b", "out_shape")

    def __init__(self, dtype: np.dtype, a: int, c: int, b: int):
        self.view_as, self.lo, self.hi = _BOUNDS[dtype]
        self.n_c, self.n_b = c, b
        self.out_shape = (a * b, n_bytes_for(c))
        if b == 1:  # channels-last
            self.kind, self.shape = ("flat", (a * c,)) if c % 8 == 0 else ("rows", (1, a, c))
        else:  # channels-first, whole samples (see _plan_for)
            self.kind, self.shape = "maps", (1, a * c * b)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        values = (x if self.view_as is None else x.view(self.view_as)).reshape(self.shape)
        out = np.empty(self.out_shape, np.uint8)
        if self.kind == "maps":
            _pack_maps(values, self.n_c, self.n_b, self.lo, self.hi, out.reshape(-1))
        elif self.kind == "flat":
            _pack_flat_by8(values, self.lo, self.hi, out.reshape(-1))
        else:
            _pack_rows(values, self.lo, self.hi, out)
        return out


def _plan_for(x: np.ndarray, axis: int) -> _Plan | None:
    """A plan for arrays laid out as ``x`` (already checked; ``axis`` >= 0),
    or None where the general path serves: inputs large enough for threads,
    empty ones, single channels (rare, and no faster here) and maps of
    one-byte states for :func:`_pack_cols` (large: the layout analysis is
    a small part of packing them)."""
    c = x.shape[axis]
    if x.nbytes >= _PARALLEL_MIN_BYTES or x.size == 0 or c < 2:
        return None
    a, b = int(np.prod(x.shape[:axis])), int(np.prod(x.shape[axis + 1 :]))
    return _Plan(x.dtype, a, c, b) if b == 1 or _maps_serve(c, b) else None


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
    if type(x) is np.ndarray and type(channel_axis) is int and x.flags.c_contiguous:
        key = (x.dtype, x.shape, channel_axis)
        plan = _PLANS.get(key, False)
        if plan:
            return plan(x)
        if plan is False:  # not seen yet: checked below, planned after
            return _pack_checked(x, channel_axis, key)
    return _pack_checked(x, channel_axis, None)


def _pack_checked(x: np.ndarray, channel_axis: int, key: tuple | None) -> np.ndarray:
    """:func:`pack` after checking its arguments; with ``key`` (a C-contiguous
    ``x`` not seen before), the plan for its layout is made and kept."""
    if not isinstance(x, np.ndarray):
        raise OptionTypeError(
            f"pack() takes a numpy.ndarray, got {type(x).__name__}; convert it with "
            "np.asarray (torch: tensor.numpy(), tensorflow: tensor.numpy())"
        )
    if x.ndim == 0:
        raise OptionError("pack() needs an array of rank >= 1 (the channel axis); got a scalar")
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, (int, np.integer)):
        raise OptionTypeError(f"channel_axis must be an int, got {channel_axis!r}")
    if not -x.ndim <= channel_axis < x.ndim:
        raise OptionError(
            f"channel_axis {channel_axis} is out of range for an array of rank {x.ndim} "
            f"(valid: {-x.ndim}..{x.ndim - 1})"
        )
    n_neurons = x.shape[channel_axis]
    if n_neurons == 0:
        raise OptionError(f"the channel axis {channel_axis} of an array of shape {x.shape} has 0 neurons")
    values, lo, hi = _comparable(x)
    axis = channel_axis % x.ndim
    if key is not None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _plan_for(x, axis)
        if plan is not None:
            return plan(x)
    if axis != x.ndim - 1:  # the channel axis last (np.moveaxis, without its checks: these are done)
        values = values.transpose(*range(axis), *range(axis + 1, x.ndim), axis)
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


def unpack(packed: np.ndarray, n_neurons: int) -> np.ndarray:
    """Invert :func:`pack`: ``bool`` array of shape ``(n_states, n_neurons)``."""
    packed = check_packed(packed, n_neurons, "unpack()")
    return np.unpackbits(packed, axis=1, count=n_neurons, bitorder="little").view(np.bool_)


@kernel
def _first_row_with_high_bits(packed, used):
    """The first row whose last byte has a bit set at or above bit ``used``; -1 if none."""
    last = packed.shape[1] - 1
    seen = np.uint8(0)
    for i in range(packed.shape[0]):  # no branch a row: 2-7x faster while every row is clean
        seen |= packed[i, last]
    if not seen >> used:
        return -1
    for i in range(packed.shape[0]):
        if packed[i, last] >> used:
            return i
    return -1


def check_packed(packed: np.ndarray, n_neurons: int, where: str) -> np.ndarray:
    """``packed`` if it holds states of ``n_neurons`` as :func:`pack` makes
    them, else a typed error that ``where`` (the caller, named in it) raises.

    The unused high bits of the last byte must be 0: a row with one set
    would count as a state of its own that unpacks to another one's bits.
    Only the last byte of each row is read, so the check is cheap."""
    if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8:
        kind = packed.dtype if isinstance(packed, np.ndarray) else type(packed).__name__
        raise OptionTypeError(f"{where} takes packed states as a uint8 numpy array (from pack()), got {kind}")
    if isinstance(n_neurons, bool) or not isinstance(n_neurons, (int, np.integer)) or n_neurons < 1:
        raise OptionError(f"{where}: n_neurons must be a positive int, got {n_neurons!r}")
    width = n_bytes_for(int(n_neurons))
    if packed.ndim != 2 or packed.shape[1] != width:
        raise PackedStateError(
            f"{where}: packed states of {n_neurons} neurons have shape (n_states, {width}), "
            f"got {packed.shape}"
        )
    used = int(n_neurons) % 8
    if used and packed.shape[0]:
        row = _first_row_with_high_bits(packed, used)
        if row >= 0:
            raise PackedStateError(
                f"{where}: row {row} of the packed states has bits set above neuron {n_neurons - 1} "
                f"(last byte {packed[row, -1]:#04x}); states of {n_neurons} neurons use the low {used} bits "
                f"of their last byte and the unused high bits must be 0, as pack() leaves them"
            )
    return packed
