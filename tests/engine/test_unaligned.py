"""The keys and padded words of packed rows, read eight bytes at a time, against numpy."""

import numpy as np
import pytest

from tensorstate_onnx.engine.arrays import as_packed, as_words
from tensorstate_onnx.engine.keys import be_keys
from tensorstate_onnx.engine.unaligned import padded_words


@pytest.mark.parametrize("n_bytes", range(1, 9))
@pytest.mark.parametrize("n_rows", [1, 2, 7, 100])
def test_row_keys_are_the_rows_big_endian_padded_at_the_low_end(n_bytes, n_rows):
    rng = np.random.default_rng(n_bytes * 1000 + n_rows)
    packed = rng.integers(0, 256, (n_rows, n_bytes), dtype=np.uint8)
    padded = np.zeros((n_rows, 8), np.uint8)
    padded[:, :n_bytes] = packed
    expected = padded.view(">u8").ravel().astype(np.uint64)
    # The last rows have fewer than eight bytes left in the array: read byte by byte.
    np.testing.assert_array_equal(be_keys(packed), expected)
    # Rows that are not contiguous in memory are read from a contiguous copy.
    wide = np.zeros((n_rows, n_bytes + 3), np.uint8)
    wide[:, :n_bytes] = packed
    np.testing.assert_array_equal(be_keys(wide[:, :n_bytes]), expected)
    # Keys order as the rows do, byte by byte.
    order = np.lexsort(packed.T[::-1])
    assert np.all(np.diff(be_keys(packed)[order].astype(object)) >= 0)


def numpy_words(packed, n_words):
    padded = np.zeros((packed.shape[0], 8 * n_words), np.uint8)
    padded[:, : packed.shape[1]] = packed
    return padded.view(np.uint64)


@pytest.mark.parametrize("n_bytes", [1, 3, 7, 8, 9, 13, 16, 17, 40])
@pytest.mark.parametrize("n_rows", [1, 2, 7, 100])
def test_padded_words_are_the_rows_zero_padded(n_bytes, n_rows):
    rng = np.random.default_rng(n_bytes * 1000 + n_rows)
    packed = rng.integers(0, 256, (n_rows, n_bytes), dtype=np.uint8)
    n_words = -(-n_bytes // 8)
    # All rows (the last ones near the array's end are read byte by byte), into garbage.
    out = np.full((n_rows, n_words), 0xA5A5A5A5A5A5A5A5, np.uint64)
    padded_words(packed.reshape(-1), n_bytes, 0, n_rows, out.view(np.uint8).reshape(-1))
    np.testing.assert_array_equal(out, numpy_words(packed, n_words))
    # Rows from the middle on, and rows of more words than they need (the rest zero).
    first = n_rows // 2
    out = np.full((n_rows - first, n_words + 1), 0xA5A5A5A5A5A5A5A5, np.uint64)
    padded_words(packed.reshape(-1), n_bytes, first, n_rows - first, out.view(np.uint8).reshape(-1))
    np.testing.assert_array_equal(out, numpy_words(packed[first:], n_words + 1))
    # as_words: the same, for rows not contiguous in memory too; aligned full rows are a view.
    wide = np.zeros((n_rows, n_bytes + 5), np.uint8)
    wide[:, :n_bytes] = packed
    np.testing.assert_array_equal(as_words(wide[:, :n_bytes], n_words), numpy_words(packed, n_words))
    # Into an array given (rows of a counter's arena), over what it held.
    into = np.full((n_rows, n_words), 0xA5A5A5A5A5A5A5A5, np.uint64)
    assert as_words(wide[:, :n_bytes], n_words, out=into) is into
    np.testing.assert_array_equal(into, numpy_words(packed, n_words))
    if n_bytes % 8 == 0:
        assert np.shares_memory(as_words(packed, n_words), packed)


@pytest.mark.parametrize("n_bytes", [1, 3, 7, 8, 9, 13, 16, 17, 40])
@pytest.mark.parametrize("n_rows", [0, 1, 2, 7, 100])
def test_packed_rows_undo_padded_words(n_bytes, n_rows):
    rng = np.random.default_rng(n_bytes * 1000 + n_rows + 7)
    packed = rng.integers(0, 256, (n_rows, n_bytes), dtype=np.uint8)
    n_words = -(-n_bytes // 8)
    for extra in (0, 1):  # rows of just enough words, and of one more (its bytes ignored)
        words = numpy_words(packed, n_words + extra)
        words.view(np.uint8)[:, n_bytes:] = 0xA5  # what lies past a row's bytes is never read back
        back = as_packed(words, n_bytes)
        assert back.dtype == np.uint8 and back.shape == (n_rows, n_bytes) and back.flags.c_contiguous
        np.testing.assert_array_equal(back, packed)
        assert not np.shares_memory(back, words)
