import math

import numpy as np
import pytest

from tensorstate_onnx import NoStatesError, OptionError, aIQ, entropy, network_efficiency
from tensorstate_onnx.engine.histogram import histogram_of_counts


def test_shannon_entropy_of_uniform_and_skewed_counts():
    assert entropy([5, 5, 5, 5]) == pytest.approx(2.0)
    p = np.array([0.5, 0.25, 0.25])
    assert entropy([2, 1, 1]) == pytest.approx(-(p * np.log2(p)).sum())
    assert entropy([7]) == 0.0


def test_renyi_orders_by_hand():
    counts = [6, 3, 1]
    p = np.array(counts) / 10
    assert entropy(counts, 0) == pytest.approx(math.log2(3))
    assert entropy(counts, 2) == pytest.approx(-math.log2((p**2).sum()))
    assert entropy(counts, 0.5) == pytest.approx(2 * math.log2(np.sqrt(p).sum()))
    assert entropy(counts, float("inf")) == pytest.approx(-math.log2(0.6))
    # alpha -> 1 approaches Shannon
    assert entropy(counts, 1 + 1e-9) == pytest.approx(entropy(counts, 1), rel=1e-6)
    # Renyi entropy is non-increasing in alpha
    values = [entropy(counts, a) for a in (0, 0.5, 1, 2, float("inf"))]
    assert values == sorted(values, reverse=True)


def test_zero_counts_are_ignored():
    assert entropy([4, 0, 4]) == pytest.approx(1.0)
    assert entropy(np.array([3, 0, 0, 1]), 0) == pytest.approx(1.0)


def _direct_entropy(counts, alpha):
    p = counts[counts > 0] / counts.sum()
    if alpha == 0:
        return math.log2(p.size)
    if alpha == 1:
        return -float((p * np.log2(p)).sum())
    if math.isinf(alpha):
        return -math.log2(p.max())
    return math.log2((p**alpha).sum()) / (1 - alpha)


@pytest.mark.parametrize("alpha", [0, 0.5, 1, 2, float("inf")])
@pytest.mark.parametrize("dtype", [np.int64, np.uint64, np.int32, np.uint8])
def test_integer_counts_match_the_direct_formula(alpha, dtype):
    rng = np.random.default_rng(3)
    counts = np.concatenate([rng.geometric(0.4, 50_000), rng.integers(0, 200, 1000)]).astype(dtype)
    expected = _direct_entropy(counts.astype(np.float64), alpha)
    assert entropy(counts, alpha) == pytest.approx(expected, rel=1e-12)
    assert entropy(counts.astype(np.float64), alpha) == pytest.approx(expected, rel=1e-12)


def _long_double_entropy(counts, alpha):
    """The Rényi entropy summed in 80-bit floats: ~3 more digits than float64, enough
    to check float64 results next to alpha = 1 where the textbook form cancels."""
    counts = np.asarray(counts, np.longdouble)
    p = counts[counts > 0] / counts.sum()
    return float(np.log2((p ** np.longdouble(alpha)).sum()) / (1 - np.longdouble(alpha)))


@pytest.mark.parametrize("alpha", [sum([0.1] * 10), np.nextafter(1.0, 2.0), 1 - 1e-12, 1 + 1e-9])
def test_alpha_within_rounding_of_one_gives_shannon(alpha):
    counts = np.arange(1, 2001)
    # The textbook form gave 16.0 (above log2(2000) = 10.97 bits) at 0.1 added ten times.
    assert entropy(counts, alpha) == pytest.approx(entropy(counts, 1), abs=1e-8)
    assert entropy(counts, alpha) <= math.log2(2000)


@pytest.mark.parametrize("alpha", [1 - 2e-3, 1 - 1e-3, 1 - 1e-5, 1 + 1e-6, 1 + 1e-4, 1 + 1e-3, 1 + 2e-3])
def test_alpha_next_to_one_matches_a_higher_precision_sum(alpha):
    counts = np.random.default_rng(5).geometric(0.01, 20_000)
    assert entropy(counts, alpha) == pytest.approx(_long_double_entropy(counts, alpha), rel=1e-11)


def test_entropy_stays_non_increasing_across_the_two_forms_next_to_one():
    counts = np.random.default_rng(6).geometric(0.02, 5_000)
    alphas = [1 - 2e-3, np.nextafter(1 - 1e-3, 0), 1 - 1e-3, 1 - 1e-6, 1, 1 + 1e-6, 1 + 1e-3, np.nextafter(1 + 1e-3, 2), 1 + 2e-3]
    values = [entropy(counts, a) for a in alphas]
    # Within the ~1e-13 the textbook form keeps at the switch (1 +- 1e-3).
    assert all(b <= a * (1 + 1e-12) for a, b in zip(values, values[1:])), values
    assert values[0] - values[-1] > 1e-3


@pytest.mark.parametrize("alpha", [0, 1, 2, float("inf")])
def test_counts_too_large_for_a_histogram(alpha):
    counts = np.array([3, 1 << 40, 5, 1 << 23, 1], np.int64)
    assert entropy(counts, alpha) == pytest.approx(_direct_entropy(counts.astype(np.float64), alpha), rel=1e-12)


@pytest.mark.parametrize("alpha", [-1, float("nan"), "1", None, True])
def test_invalid_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        entropy([1, 2], alpha)


@pytest.mark.parametrize("counts", [[], [0, 0], [-1, 2], [np.inf, 1], np.array([2, -3], np.int64), np.zeros(4, np.uint8)])
def test_invalid_counts(counts):
    with pytest.raises(ValueError, match="count"):
        entropy(counts)


def test_network_efficiency_is_geometric_mean():
    assert network_efficiency([0.25, 1.0]) == pytest.approx(0.5)
    assert network_efficiency([0.2, 0.4, 0.8]) == pytest.approx(0.4)
    assert network_efficiency([0.5, 0.0]) == 0.0


def test_network_efficiency_of_model_like():
    class Layer:
        def __init__(self, value):
            self.value = value

        def efficiency(self):
            return self.value

    class Model:
        efficiency_layers = [Layer(0.1), Layer(0.9)]

    assert network_efficiency(Model()) == pytest.approx(0.3)


def test_network_efficiency_of_a_model_runs_its_layers_side_by_side_in_order(monkeypatch):
    """Finishing each layer's counting is its own work: layers run on threads
    (two meet at a barrier, which sequential calls never would), results keep
    the layers' order, a layer listed twice is asked once, and the first
    failing layer's error is what the caller gets."""
    import threading

    from tensorstate_onnx import metrics

    monkeypatch.setattr(metrics, "usable_cpus", lambda: 2)
    barrier = threading.Barrier(2, timeout=10)
    asked = []

    class Layer:
        def __init__(self, value, meets=False, fails=False):
            self.value, self.meets, self.fails = value, meets, fails

        def efficiency(self):
            asked.append(self)
            if self.meets:
                barrier.wait()
            if self.fails:
                raise NoStatesError(f"layer {self.value} has no states")
            return self.value

    first, second, third = Layer(0.1, meets=True), Layer(0.9, meets=True), Layer(0.3)

    class Model:
        efficiency_layers = [first, second, third, first]

    assert network_efficiency(Model()) == pytest.approx((0.1 * 0.9 * 0.3 * 0.1) ** 0.25)
    assert sorted(map(id, asked)) == sorted(map(id, [first, second, third]))

    class Failing:
        efficiency_layers = [Layer(0.5), Layer(0.2, fails=True), Layer(0.7, fails=True)]

    with pytest.raises(NoStatesError, match="layer 0.2 has no states"):
        network_efficiency(Failing())


def test_network_efficiency_errors():
    with pytest.raises(ValueError, match="no efficiencies"):
        network_efficiency([])
    for bad in ([0.5, -0.1], [0.5, 1.5], [0.5, float("nan")], [float("inf")]):
        with pytest.raises(ValueError, match=r"efficiencies must be numbers in \[0, 1\]"):
            network_efficiency(bad)
    for not_a_list in (0.5, np.array(0.5), np.array([[0.5, 0.25]])):
        with pytest.raises(TypeError, match="list of floats"):
            network_efficiency(not_a_list)
    assert network_efficiency(np.array([0.25, 1.0], np.float32)) == pytest.approx(0.5)


def test_aiq_by_hand():
    assert aIQ(0.25, 1.0, 1) == pytest.approx(0.5)
    assert aIQ(0.4, 0.9, 2) == pytest.approx((0.4 * 0.81) ** (1 / 3))
    assert aIQ(0.3, 0.8, np.int64(5)) == pytest.approx((0.3 * 0.8**5) ** (1 / 6))


@pytest.mark.parametrize("weight", [0, -1, 1.5, True, "2", None])
def test_aiq_weight_must_be_int_at_least_one(weight):
    with pytest.raises(ValueError, match="weight"):
        aIQ(0.5, 0.5, weight)


@pytest.mark.parametrize("args", [(1.5, 0.5), (0.5, -0.1), (float("nan"), 0.5)])
def test_aiq_inputs_in_unit_interval(args):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        aIQ(*args, 1)


def test_extreme_orders_and_counts_stay_exact():
    # order 2000 is within 1e-3 of the min-entropy; p**2000 underflows without logs
    assert entropy([1, 2, 3], 2000) == pytest.approx(2000 / 1999, rel=1e-12)
    assert entropy([1e308, 1e308]) == pytest.approx(1.0)
    assert entropy([1e308, 1e308], 2) == pytest.approx(1.0)
    assert entropy(np.array([1e-300, 1e-300, 2e-300]), 0.5) == pytest.approx(entropy([1, 1, 2], 0.5))
    for alpha in (0, 0.5, 1, 2, float("inf")):
        assert math.copysign(1, entropy([5], alpha)) == 1.0  # 0.0, never -0.0


def test_counts_that_are_not_real_numbers_are_refused():
    with pytest.raises(OptionError, match="real, non-negative counts, got an array of complex128"):
        entropy([1 + 1j, 2])
    with pytest.raises(OptionError, match="got an array of <U1"):
        entropy(["a", "b"])


def test_aiq_of_a_large_weight_does_not_underflow():
    assert aIQ(0.5, 0.5, 1100) == pytest.approx(0.5, rel=1e-12)
    assert aIQ(0.9, 0.99, 10**6) == pytest.approx(0.99, rel=1e-5)
    assert aIQ(0.0, 0.9, 3) == 0.0 and aIQ(0.5, 0.0, 3) == 0.0


def test_network_efficiency_refuses_a_dict_and_non_numbers():
    with pytest.raises(TypeError, match=r"pass list\(d.values\(\)\)"):
        network_efficiency({"a": 0.5})
    with pytest.raises(OptionError, match="must be real numbers"):
        network_efficiency([0.5, "0.5"])


ALPHAS = [0, 0.5, 1, 1.5, 2, 3.7, float("inf")]


@pytest.mark.parametrize("scale", [1, 1 << 23])  # counts below and above the bincount limit
def test_histogram_entropy_equals_the_entropy_of_the_expanded_counts_exactly(scale):
    from tensorstate_onnx.metrics import histogram_entropy

    rng = np.random.default_rng(scale)
    counts = (rng.zipf(1.7, 4000) % 5000 + 1).astype(np.int64) * scale
    values, multiplicities = np.unique(counts, return_counts=True)
    for alpha in ALPHAS:
        assert histogram_entropy(values, multiplicities, alpha) == entropy(counts, alpha), alpha
        assert histogram_entropy(values, multiplicities, alpha) == entropy(np.repeat(values, multiplicities), alpha)
    # Zero multiplicities are no states.
    with_zero = histogram_entropy(np.r_[values, values[-1] + 1], np.r_[multiplicities, 0], 2)
    assert with_zero == entropy(counts, 2)


def test_histogram_entropy_refuses_what_is_not_a_histogram():
    from tensorstate_onnx import NoStatesError
    from tensorstate_onnx.metrics import histogram_entropy

    with pytest.raises(OptionError, match="same length"):
        histogram_entropy([1, 2], [1])
    with pytest.raises(OptionError, match="integer"):
        histogram_entropy([1.0, 2.0], [1, 1])
    with pytest.raises(OptionError, match="ascending"):
        histogram_entropy([2, 1], [1, 1])
    with pytest.raises(OptionError, match="ascending"):
        histogram_entropy([0, 1], [1, 1])
    with pytest.raises(NoStatesError):
        histogram_entropy([], [])
    with pytest.raises(OptionError, match="alpha"):
        histogram_entropy([1], [1], -1)


def test_histogram_of_few_states_seen_very_often_is_sorted_not_bincounted():
    """A bincount's table would be as long as the largest count (10**12 here)."""
    counts = np.array([10**12, 3, 10**12, 7, 3], np.int64)
    values, multiplicities = histogram_of_counts(counts)
    assert values.tolist() == [3, 7, 10**12] and multiplicities.tolist() == [2, 1, 2]
    small = np.random.default_rng(0).integers(0, 50, 10_000)
    values, multiplicities = histogram_of_counts(small)
    want_values, want_multiplicities = np.unique(small[small > 0], return_counts=True)
    assert values.tolist() == want_values.tolist() and multiplicities.tolist() == want_multiplicities.tolist()

