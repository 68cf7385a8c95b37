import numpy as np
import pytest

from tensorstate_onnx.engine.histogram import histogram_of_counts
from tensorstate_onnx.errors import OptionError


def numpy_histogram(counts):
    counts = np.asarray(counts).ravel()
    values, multiplicities = np.unique(counts[counts > 0], return_counts=True)
    return values.tolist(), multiplicities.tolist()


def as_lists(histogram):
    values, multiplicities = histogram
    assert values.dtype == np.int64 and multiplicities.dtype == np.int64
    return values.tolist(), multiplicities.tolist()


@pytest.mark.parametrize(
    "counts",
    [
        np.ones(1_000_003, np.int64),  # all distinct: one value, a length not divisible by four
        np.random.default_rng(0).integers(0, 5, 10_001),  # small counts, zeros among them
        np.random.default_rng(1).integers(1, 3000, 20_000),  # across the table's edge (1024)
        np.array([1023, 1024, 1025, 1023, 10**12, 10**12, 1], np.int64),
        np.array([7], np.int64),
        np.array([0, 0, 0], np.int64),
    ],
)
def test_histogram_equals_numpy(counts):
    assert as_lists(histogram_of_counts(counts)) == numpy_histogram(counts)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint32, np.int32, np.uint64])
def test_histogram_of_any_integer_dtype(dtype):
    counts = np.random.default_rng(2).integers(0, 200, 999).astype(dtype)
    assert as_lists(histogram_of_counts(counts)) == numpy_histogram(counts)


def test_histogram_of_nothing_and_of_a_view():
    assert as_lists(histogram_of_counts(np.empty(0, np.int64))) == ([], [])
    counts = np.arange(40, dtype=np.int64).reshape(5, 8)[:, ::3]  # not contiguous, two-dimensional
    assert as_lists(histogram_of_counts(counts)) == numpy_histogram(counts)


def test_histogram_refuses_what_are_not_counts():
    with pytest.raises(OptionError, match="integer"):
        histogram_of_counts(np.array([1.0, 2.0]))
    with pytest.raises(OptionError, match="2\\*\\*63"):
        histogram_of_counts(np.array([2**63], np.uint64))
    with pytest.raises(OptionError, match="negative"):
        histogram_of_counts(np.array([3, -1, 2], np.int64))
