"""The radix sort and the sort the counter picks, against numpy's sort."""

import numpy as np
import pytest

from tensorstate_onnx.engine import radix
from tensorstate_onnx.engine.radix import radix_sort, sort_keys


def _keys(kind: str, dtype, n: int, rng) -> np.ndarray:
    bits = np.iinfo(dtype).bits
    keys = rng.integers(0, np.iinfo(dtype).max, n, dtype=dtype, endpoint=True)
    if kind == "short states":  # big-endian keys of 3-byte states: the low bytes are zero
        keys &= dtype(((1 << 24) - 1) << (bits - 24))
    elif kind == "repeats":
        keys = rng.choice(keys[:7], n) if n else keys
    elif kind == "one byte differs":  # every other byte is shared: one pass
        keys = (keys & dtype(0xFF00)) | dtype(0x5A0000A5)
    elif kind == "equal":
        keys[:] = keys[0] if n else 0
    return keys


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("kind", ["random", "short states", "repeats", "one byte differs", "equal"])
@pytest.mark.parametrize("n", [0, 1, 2, 3, 257, 5000, 300_000])
def test_radix_sort_equals_numpy(dtype, kind, n):
    keys = _keys(kind, dtype, n, np.random.default_rng(n))
    expected = np.sort(keys)
    scratch = np.full(n + 5, 7, dtype)  # larger than needed: only the first n are used
    radix_sort(keys, scratch)
    np.testing.assert_array_equal(keys, expected)


def test_radix_sort_extremes_of_each_byte():
    keys = np.array([2**64 - 1, 0, 2**63, 255, 2**56, 2**64 - 256, 1], np.uint64)
    expected = np.sort(keys)
    radix_sort(keys, np.empty_like(keys))
    np.testing.assert_array_equal(keys, expected)


@pytest.mark.parametrize("use_radix", [True, False])
@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
def test_sort_keys_sorts_by_either_choice_with_a_scratch_of_another_dtype(monkeypatch, use_radix, dtype):
    """The counter hands its int64 count array over as scratch, for keys of either width."""
    monkeypatch.setattr(radix, "radix_faster", lambda _dtype: use_radix)
    rng = np.random.default_rng(3)
    keys = rng.integers(0, np.iinfo(dtype).max, 70_000, dtype=dtype, endpoint=True)
    expected = np.sort(keys)
    scratch = np.empty(keys.size, np.int64)
    sort_keys(keys, scratch)
    np.testing.assert_array_equal(keys, expected)
    small = keys[::-1][:100].copy()
    sort_keys(small)
    np.testing.assert_array_equal(small, np.sort(keys[::-1][:100]))


def test_sort_keys_allocates_when_the_scratch_is_too_small():
    keys = np.random.default_rng(4).integers(0, 2**32, 10_000, dtype=np.uint64)
    expected = np.sort(keys)
    sort_keys(keys, np.empty(10, np.int64))
    np.testing.assert_array_equal(keys, expected)


def test_sort_keys_leaves_signed_keys_to_numpy(monkeypatch):
    monkeypatch.setattr(radix, "radix_faster", lambda _dtype: True)
    keys = np.random.default_rng(5).integers(-(2**62), 2**62, 10_000, dtype=np.int64)
    expected = np.sort(keys)
    sort_keys(keys)
    np.testing.assert_array_equal(keys, expected)


def test_radix_faster_is_decided_once_per_dtype():
    radix.radix_faster.cache_clear()
    first = radix.radix_faster(np.dtype(np.uint64))
    assert isinstance(first, bool)
    assert radix.radix_faster(np.dtype(np.uint64)) is first
    assert radix.radix_faster.cache_info().hits >= 1
