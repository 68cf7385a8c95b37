"""Entropy, network efficiency and aIQ, as defined by TensorState 0.4.

These functions take numbers, not models, except that
``network_efficiency`` also accepts anything with ``efficiency_layers``.
Integer counts become their histogram first (the engine's
:func:`~tensorstate_onnx.engine.histogram.histogram_of_counts`, imported when
first needed: importing the package loads no numba).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from numbers import Integral, Real

import numpy as np

from ._system import usable_cpus
from .errors import NoStatesError, OptionError, OptionTypeError

__all__ = ["MAX_AIQ_WEIGHT", "aIQ", "check_aiq_weight", "check_efficiency_orders", "entropy", "histogram_entropy", "network_efficiency"]


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or math.isnan(alpha) or alpha < 0:
        raise OptionError(f"alpha must be a number >= 0 (0, 1, 2, ..., or float('inf')), got {alpha!r}")
    return float(alpha)


def check_efficiency_orders(alpha1: float, alpha2: float | None) -> None:
    """Refuse an efficiency ``H(alpha1) / H(alpha2)`` that is not one.

    Rényi entropy does not grow with its order, so the ratio lies in [0, 1]
    only when ``alpha2 < alpha1``; like TensorState 0.4, any other pair is
    refused rather than reported as an efficiency above 1.
    """
    alpha1 = _check_alpha(alpha1)
    if alpha2 is not None and not _check_alpha(alpha2) < alpha1:
        raise OptionError(
            f"efficiency(alpha1={alpha1!r}, alpha2={alpha2!r}) needs alpha2 < alpha1 (Rényi entropy falls "
            "as its order grows, so only then is the ratio an efficiency in [0, 1]); "
            "alpha2=None divides by the number of neurons"
        )


def _distribution(array: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(values, weights)``: the positive counts of ``array`` (not empty) as
    float64, each standing for ``weights`` states (``None``: one each).

    Integer counts always become their histogram (values ascending), the
    form :func:`histogram_entropy` takes, so that the entropy of counts and
    the entropy of their histogram are the same float.
    """
    array = array.ravel()
    if array.dtype.kind not in "uif":
        raise OptionError(f"entropy() needs real, non-negative counts, got an array of {array.dtype}")
    if array.dtype.kind in "ui":
        if array.min() < 0:
            raise OptionError("entropy() needs finite, non-negative counts")
        from .engine.histogram import histogram_of_counts

        values, weights = histogram_of_counts(array)
        return values.astype(np.float64), weights.astype(np.float64)
    array = array.astype(np.float64, copy=False)
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise OptionError("entropy() needs finite, non-negative counts")
    return array[array > 0], None


def entropy(counts, alpha: float = 1) -> float:
    """Rényi entropy, in bits, of the distribution given by ``counts``.

    ``alpha=1`` is Shannon's entropy (the limit), ``alpha=0`` the Hartley
    entropy ``log2(#observed states)``, ``alpha=inf`` the min-entropy.
    """
    alpha = _check_alpha(alpha)
    array = np.asarray(counts)
    if array.size == 0:
        raise NoStatesError("entropy() needs at least one count; no states were recorded")
    values, weights = _distribution(array)
    if values.size == 0:
        raise NoStatesError("entropy() needs at least one positive count; no states were recorded")
    return _renyi(values, weights, alpha)


def histogram_entropy(values, multiplicities, alpha: float = 1) -> float:
    """Rényi entropy, in bits, of counts given as their histogram:
    ``multiplicities[i]`` states were each seen ``values[i]`` times
    (``StateCounter.count_histogram()``).

    Equal, to the last bit, to ``entropy(np.repeat(values, multiplicities),
    alpha)`` without expanding the counts: a sharded run adds up the
    histograms of its partitions and never holds one count per state.
    ``values`` must be distinct positive integers in ascending order.
    """
    alpha = _check_alpha(alpha)
    values, multiplicities = np.asarray(values), np.asarray(multiplicities)
    if values.ndim != 1 or values.shape != multiplicities.shape:
        raise OptionError(
            f"histogram_entropy() needs two 1-d arrays of the same length, got shapes {values.shape} "
            f"and {multiplicities.shape}"
        )
    if values.size == 0:
        raise NoStatesError("histogram_entropy() needs at least one state; no states were recorded")
    if values.dtype.kind not in "ui" or multiplicities.dtype.kind not in "ui":
        raise OptionError("histogram_entropy() needs integer values and multiplicities")
    keep = multiplicities > 0
    values, multiplicities = values[keep], multiplicities[keep]
    if values.size == 0:
        raise NoStatesError("histogram_entropy() needs at least one state; no states were recorded")
    if values[0] < 1 or np.any(values[1:] <= values[:-1]):
        raise OptionError("histogram_entropy() needs distinct positive values in ascending order")
    return _renyi(values.astype(np.float64), multiplicities.astype(np.float64), alpha)


_LN2 = math.log(2.0)
# Below this distance of alpha from 1 the entropy is summed as a correction to
# Shannon's; above it, the log-sum-exp form loses at most ~1e-13 relative.
_NEAR_SHANNON = 1e-3


def _renyi(values: np.ndarray, weights: np.ndarray | None, alpha: float) -> float:
    """The entropy of ``values`` (positive float64), each standing for
    ``weights`` states (``None``: one each)."""

    def total(terms: np.ndarray) -> float:
        return float(np.sum(terms if weights is None else weights * terms))

    # Probabilities in logs, from counts scaled by their largest: no sum of
    # counts overflows and no power of a probability underflows to log2(0).
    scaled = values / values.max()
    log_p = np.log2(scaled) - math.log2(total(scaled))
    if alpha == 0:
        value = math.log2(values.size if weights is None else float(weights.sum()))
    elif alpha == 1:
        value = -total(np.exp2(log_p) * log_p)
    elif math.isinf(alpha):
        value = -float(log_p.max())
    elif abs(alpha - 1.0) < _NEAR_SHANNON:
        # log2(sum p**alpha) / (1 - alpha) cancels catastrophically next to alpha = 1
        # (0.1 added ten times is 0.9999999999999999): sum p**alpha is 1 plus the small
        # sum of p * expm1((alpha - 1) ln p), whose log1p keeps every digit.
        d = alpha - 1.0
        near = total(np.exp2(log_p) * np.expm1(d * _LN2 * log_p))
        value = -math.log1p(near) / (_LN2 * d)
    else:
        exponent = alpha * log_p
        top = float(exponent.max())
        value = (top + math.log2(total(np.exp2(exponent - top)))) / (1.0 - alpha)
    return max(value, 0.0) + 0.0  # + 0.0 turns -0.0 into 0.0


def network_efficiency(efficiencies) -> float:
    """Geometric mean of layer efficiencies.

    ``efficiencies`` is a list of floats or anything with ``efficiency_layers``
    (a Keras model, a torch module or an ONNX efficiency model), whose layers'
    ``efficiency()`` are used. Unlike TensorState 0.4, which returned None with
    a warning, an empty list raises ``ValueError``.
    """
    layers = getattr(efficiencies, "efficiency_layers", None)
    if layers is not None:
        values = _layer_efficiencies(list(layers))
    elif isinstance(efficiencies, np.ndarray) and efficiencies.ndim == 1:
        values = efficiencies.tolist()
    elif (
        isinstance(efficiencies, Iterable) and not isinstance(efficiencies, (str, bytes, Mapping, np.ndarray))
    ):
        values = list(efficiencies)
    else:
        raise OptionTypeError(
            "network_efficiency() takes a list of floats or a model with efficiency_layers "
            f"(from build_efficiency_model), got {type(efficiencies).__name__}"
            + (" (pass list(d.values()) for a dict of efficiencies)" if isinstance(efficiencies, Mapping) else "")
        )
    if not values:
        raise OptionError(
            "network_efficiency() got no efficiencies; attach probes with build_efficiency_model "
            "and run data through the model first"
        )
    if any(isinstance(v, bool) or not isinstance(v, Real) for v in values):
        raise OptionError(f"efficiencies must be real numbers, got {values}")
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)) or np.any(array < 0) or np.any(array > 1):
        raise OptionError(f"efficiencies must be numbers in [0, 1], got {values}")
    if np.any(array == 0):
        return 0.0
    return float(np.exp(np.mean(np.log(array))))


def _layer_efficiencies(layers: list) -> list[float]:
    """Every layer's ``efficiency()``, in order, several layers at a time on
    the cores this process may use: after a run most of the time goes to
    counting the states each layer still buffers and merging its runs, each
    layer's its own work in kernels that release the GIL."""
    unique = list({id(layer): layer for layer in layers}.values())  # a layer listed twice is counted once
    workers = min(len(unique), usable_cpus())
    if workers <= 1:
        return [layer.efficiency() for layer in layers]
    with ThreadPoolExecutor(workers, thread_name_prefix="tensorstate-efficiency") as pool:
        found = dict(zip(map(id, unique), pool.map(lambda layer: layer.efficiency(), unique)))
    return [found[id(layer)] for layer in layers]


MAX_AIQ_WEIGHT = 10**6
"""Past this weight aIQ equals the accuracy to six digits (and a float cannot hold every int)."""


def check_aiq_weight(weight: int) -> None:
    """Raise OptionError unless ``weight`` is an int in [1, MAX_AIQ_WEIGHT]."""
    if isinstance(weight, bool) or not isinstance(weight, Integral) or not 1 <= weight <= MAX_AIQ_WEIGHT:
        raise OptionError(f"aIQ weight must be an int from 1 to {MAX_AIQ_WEIGHT:,}, got {weight!r}")


def aIQ(net_efficiency: float, accuracy: float, weight: int) -> float:  # noqa: N802 (reference name)
    """Artificial intelligence quotient: ``(net_efficiency * accuracy**weight) ** (1/(weight+1))``.

    ``weight`` is an int >= 1; larger values weigh accuracy more. Computed in
    logs, so a large weight does not underflow to 0.
    """
    check_aiq_weight(weight)
    for name, value in (("net_efficiency", net_efficiency), ("accuracy", accuracy)):
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 1:
            raise OptionError(f"aIQ {name} must be a number in [0, 1], got {value!r}")
    if net_efficiency == 0 or accuracy == 0:
        return 0.0
    weight = int(weight)
    return math.exp((math.log(net_efficiency) + weight * math.log(accuracy)) / (weight + 1))
