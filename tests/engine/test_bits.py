"""Weighted per-neuron bit counts of packed states, against numpy's unpackbits."""

import numpy as np
import pytest

from tensorstate_onnx.engine import pack
from tensorstate_onnx.engine.bits import weighted_bit_counts


@pytest.mark.parametrize("n_neurons", [1, 7, 8, 9, 63, 64, 65, 320, 3072])
def test_weighted_bit_counts_equal_unpacked_sums(n_neurons):
    rng = np.random.default_rng(n_neurons)
    packed = pack(rng.standard_normal((700, n_neurons)).astype(np.float32), 1)
    weights = rng.integers(1, 10**9, 700)  # large weights: sums past 2**32
    bits = np.unpackbits(packed, axis=1, count=n_neurons, bitorder="little").astype(np.int64)
    got = weighted_bit_counts(packed, weights, n_neurons)
    assert got.dtype == np.int64 and got.shape == (n_neurons,)
    np.testing.assert_array_equal(got, weights @ bits)


def test_no_states_no_counts():
    np.testing.assert_array_equal(weighted_bit_counts(np.empty((0, 2), np.uint8), np.empty(0, np.int64), 12), np.zeros(12))
