"""The keys of packed rows, read eight bytes at a time, against numpy."""

import numpy as np
import pytest

from tensorstate_onnx.engine.keys import be_keys


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
