"""Small array helpers shared by the counting modules."""

from __future__ import annotations

import numpy as np

from .unaligned import packed_rows, padded_words

__all__ = ["as_packed", "as_words", "held_bytes", "narrowest", "trimmed", "writable"]


def trimmed(a: np.ndarray, m: int) -> np.ndarray:
    """The first ``m`` items of ``a``, an array just allocated here and seen
    by nobody else: shrunk in place, so the allocator takes the tail back
    without a copy (which would briefly hold a large run twice)."""
    if m < a.shape[0]:
        a.resize(m, refcheck=False)
    return a


def held_bytes(a: np.ndarray | None) -> int:
    """Bytes kept alive by ``a`` (its base when it is a view)."""
    if a is None:
        return 0
    return a.base.nbytes if isinstance(a.base, np.ndarray) else a.nbytes


def as_words(packed: np.ndarray, n_words: int, out: np.ndarray | None = None) -> np.ndarray:
    """Rows of ``packed`` as native uint64 words, zero padded: into ``out``
    (uint64 (n, n_words), C-contiguous) when given, else a new array (no copy
    when the rows are whole aligned words). Rows of whole words are copied
    as one block, others eight bytes a load and a store (numpy's copy of
    short strided rows costs ~19 ns a row)."""
    n, width = packed.shape
    whole = width == 8 * n_words
    if out is None:
        if whole and packed.flags.c_contiguous and packed.ctypes.data % 8 == 0:
            return packed.view(np.uint64)
        out = np.empty((n, n_words), np.uint64)
    if whole:
        out.view(np.uint8)[:] = packed
    else:
        padded_words(np.ascontiguousarray(packed).reshape(-1), width, 0, n, out.view(np.uint8).reshape(-1))
    return out


def as_packed(words: np.ndarray, n_bytes: int) -> np.ndarray:
    """The first ``n_bytes`` bytes of each row of ``words`` (uint64 (n, n_words),
    as :func:`as_words` made them): the packed rows, a new uint8 (n, n_bytes)
    array (numpy's copy of short strided rows costs about twice as much)."""
    words = np.ascontiguousarray(words)
    out = np.empty((words.shape[0], n_bytes), np.uint8)
    if out.size:
        packed_rows(words.view(np.uint8).reshape(-1), words.shape[1] * 8, n_bytes, out.reshape(-1))
    return out


_NARROW = tuple((int(np.iinfo(dtype).max), dtype) for dtype in (np.uint8, np.uint16, np.uint32))


def narrowest(counts: np.ndarray) -> np.ndarray:
    """``counts`` in the smallest unsigned dtype that holds them (a pickle is mostly counts of 1)."""
    top = int(counts.max()) if counts.size else 0
    for limit, dtype in _NARROW:
        if top <= limit:
            return counts.astype(dtype)
    return counts


def writable(a: np.ndarray) -> np.ndarray:
    """``a`` itself when it is writable, aligned and C-contiguous, else a copy
    that is: arrays unpickled from another process's buffers may be
    read-only or unaligned, which the kernels would compile for anew or
    refuse to write."""
    flags = a.flags
    if flags.c_contiguous and flags.aligned and flags.writeable:
        return a  # (np.require checks the same, at several microseconds a call)
    return np.require(a, requirements=("C", "A", "W"))
