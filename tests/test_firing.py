"""Firing rates, dead and always-firing neurons of a probe, against numpy on the raw states."""

from __future__ import annotations

import numpy as np
import pytest

from tensorstate_onnx import NoStatesError, OnnxEfficiencyModel, StateCaptureProbe


def _reference_rates(capture_) -> np.ndarray:
    """Firing rates from the stored raw states: unpack every row, mean over rows."""
    rows = np.asarray(capture_.states[:])
    bits = np.unpackbits(rows, axis=1, bitorder="little")[:, : capture_.n_neurons]
    return bits.mean(axis=0)


@pytest.fixture(scope="module")
def demo_run(demo_model, demo_data):
    """The demo with Conv, Elu, MaxPool and Gemm probed (raw states kept), run on its test data."""
    model = OnnxEfficiencyModel(
        demo_model, ["Conv", "Elu", "MaxPool", "Gemm"], method="both", keep_states=True, providers="cpu"
    )
    model.predict(demo_data[0], batch_size=100, progress=False)
    return model


def test_firing_rates_equal_numpy_on_the_raw_states_of_the_demo(demo_run):
    layers = demo_run.efficiency_layers
    assert len(layers) >= 8
    for layer in layers:
        rates = layer.firing_rates()
        reference = _reference_rates(layer)
        assert rates.dtype == np.float64 and rates.shape == (layer.n_neurons,)
        np.testing.assert_array_equal(rates, reference)  # exactly
        assert np.array_equal(layer.dead_neurons(), np.flatnonzero(reference == 0))
        assert np.array_equal(layer.always_firing(), np.flatnonzero(reference == 1))
        assert layer.firing_counts().sum() == np.unpackbits(np.asarray(layer.states[:])).sum()
    assert all(0 < layer.firing_rates().mean() < 1 for layer in layers)


def test_firing_rates_over_many_batches():
    rng = np.random.default_rng(3)
    probe = StateCaptureProbe("dense", keep_states=True)
    for n in (40, 1, 77):
        x = rng.standard_normal((n, 6, 37)).astype(np.float32)
        x[..., 5] = -1.0  # dead
        x[..., 30] = 2.0  # always fires
        probe.record(x, -1)
    rates = probe.firing_rates()
    np.testing.assert_array_equal(rates, _reference_rates(probe))
    assert probe.dead_neurons().tolist() == [5]
    assert probe.always_firing().tolist() == [30]


def test_rates_from_counts_only_without_raw_states():
    x = np.array([[1, -1, 0, 2]] * 4 + [[-1, 1, 0, 0]] * 2 + [[0, 0, 0, 0], [3, 3, 3, 3]], np.float32)
    probe = StateCaptureProbe("relu", keep_states=False)
    probe.record(x, 1)
    assert probe.firing_rates().tolist() == [5 / 8, 3 / 8, 1 / 8, 5 / 8]
    assert probe.dead_neurons().tolist() == [] and probe.always_firing().tolist() == []
    with pytest.raises(NoStatesError, match="has recorded no states yet"):
        StateCaptureProbe("empty").firing_rates()
