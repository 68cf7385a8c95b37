"""The radix sort of uint64 keys and the lexicographic order of word rows, against numpy."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorstate_onnx.engine.hashing import tag
from tensorstate_onnx.engine.sort import RADIX_MIN, lex_order, sort_keys

SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@SLOW
@given(
    n=st.integers(RADIX_MIN - 3, 3 * RADIX_MIN),
    zero_low_bytes=st.integers(0, 7),
    few_values=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_radix_sort_of_keys_equals_np_sort(n, zero_low_bytes, few_values, seed):
    """Keys like those of 3..8-byte states (low bytes zero), with many or few
    distinct values; the kernel runs above _RADIX_MIN keys."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    if few_values:
        keys = rng.choice(keys[:5], n)
    keys = (keys >> np.uint64(8 * zero_low_bytes)) << np.uint64(8 * zero_low_bytes)
    expected = np.sort(keys)
    sort_keys(keys)
    np.testing.assert_array_equal(keys, expected)


@pytest.mark.parametrize("n", [RADIX_MIN, 100_000, 1 << 20])
def test_radix_sort_of_tags_skips_their_ordered_index_bits(n):
    """Tags (hash high bits | row index) sort like np.sort though only the hash
    bits are sorted: the index bits are in order within equal hash bits."""
    rng = np.random.default_rng(n)
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    hashes[rng.integers(0, n, n // 4)] = hashes[0]  # many equal hashes
    bits = int(n - 1).bit_length()
    tags = np.empty(n, np.uint64)
    tag(hashes, bits, tags)
    expected = np.sort(tags)
    sort_keys(tags, bits)
    np.testing.assert_array_equal(tags, expected)


@pytest.mark.parametrize("n, n_cols, values", [(0, 2, 5), (1, 3, 5), (5000, 2, 3), (20_000, 4, 2), (3000, 1, 1000)])
def test_lex_order_equals_np_lexsort(n, n_cols, values):
    """Distinct rows in long and short groups of equal leading columns."""
    rng = np.random.default_rng(n + n_cols)
    rows = np.unique(rng.integers(0, values, (n, n_cols)).astype(np.uint64), axis=0)
    rows = rows[rng.permutation(len(rows))]
    expected = np.lexsort(rows.T[::-1]) if len(rows) else np.empty(0, np.int64)
    np.testing.assert_array_equal(rows[lex_order(rows)], rows[expected])
