"""Sorted tags and the lexicographic order of word rows, against numpy."""

import numpy as np
import pytest

from tensorstate_onnx.engine.hashing import tag
from tensorstate_onnx.engine.sort import lex_order



@pytest.mark.parametrize("n", [100, 100_000, 1 << 20])
def test_sorted_tags_keep_row_order_within_equal_hash_bits(n):
    """What dedup_words relies on: sorting whole tags (hash high bits | row
    index) orders rows by their hash bits and, within equal bits, by row."""
    rng = np.random.default_rng(n)
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    hashes[rng.integers(0, n, n // 4)] = hashes[0]  # many equal hashes
    bits = int(n - 1).bit_length()
    tags = np.empty(n, np.uint64)
    tag(hashes, bits, tags)
    tags.sort()
    rows = (tags & np.uint64((1 << bits) - 1)).astype(np.int64)
    high = hashes >> np.uint64(bits)
    np.testing.assert_array_equal(rows, np.lexsort((np.arange(n), high)))


@pytest.mark.parametrize("n, n_cols, values", [(0, 2, 5), (1, 3, 5), (5000, 2, 3), (20_000, 4, 2), (3000, 1, 1000)])
def test_lex_order_equals_np_lexsort(n, n_cols, values):
    """Distinct rows in long and short groups of equal leading columns."""
    rng = np.random.default_rng(n + n_cols)
    rows = np.unique(rng.integers(0, values, (n, n_cols)).astype(np.uint64), axis=0)
    rows = rows[rng.permutation(len(rows))]
    expected = np.lexsort(rows.T[::-1]) if len(rows) else np.empty(0, np.int64)
    np.testing.assert_array_equal(rows[lex_order(rows)], rows[expected])
