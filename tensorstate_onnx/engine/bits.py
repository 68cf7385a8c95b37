"""Per-neuron sums over packed states: how often each neuron fires, weighted.

Firing rates need, for every neuron, the summed counts of the distinct states
in which it fires. Unpacking every state to one byte per neuron and summing
costs a pass over ``8 x`` the packed bytes (and an int64 matrix product numpy
does without BLAS); instead each byte position keeps a weighted histogram of
its 256 values, one add per packed byte, and the bits are read off the
histograms at the end.
"""

from __future__ import annotations

import numpy as np

from .jit import kernel

__all__ = ["weighted_bit_counts"]


@kernel
def _byte_histograms(packed, weights, out):
    """``out[k, v]`` += the weight of every row whose byte ``k`` is ``v``."""
    for i in range(packed.shape[0]):
        w = weights[i]
        for k in range(packed.shape[1]):
            out[k, packed[i, k]] += w


def weighted_bit_counts(packed: np.ndarray, weights: np.ndarray, n_neurons: int) -> np.ndarray:
    """For each of ``n_neurons`` neurons, the summed ``weights`` of the rows of
    ``packed`` (``uint8 (rows, ceil(n/8))``, little-endian bits as
    :func:`~tensorstate_onnx.engine.pack` makes them) in which its bit is set
    (``int64[n_neurons]``)."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    histograms = np.zeros((packed.shape[1], 256), np.int64)
    _byte_histograms(packed, np.ascontiguousarray(weights, dtype=np.int64), histograms)
    # bit j of byte value v, for every v: (256, 8) of 0/1
    bit_of_value = (np.arange(256)[:, None] >> np.arange(8)) & 1
    per_bit = histograms @ bit_of_value  # (n_bytes, 8): small, whatever the number of rows
    return per_bit.reshape(-1)[:n_neurons].astype(np.int64)
