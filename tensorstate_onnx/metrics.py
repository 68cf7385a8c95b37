"""Entropy, network efficiency and aIQ, as defined by TensorState 0.4.

Pure numpy: these functions take numbers, not models, except that
``network_efficiency`` also accepts anything with ``efficiency_layers``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real

import numpy as np

__all__ = ["entropy", "network_efficiency", "aIQ"]


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or math.isnan(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a number >= 0 (0, 1, 2, ..., or float('inf')), got {alpha!r}")
    return float(alpha)


def entropy(counts, alpha: float = 1) -> float:
    """Rényi entropy, in bits, of the distribution given by ``counts``.

    ``alpha=1`` is Shannon's entropy (the limit), ``alpha=0`` the Hartley
    entropy ``log2(#observed states)``, ``alpha=inf`` the min-entropy.
    """
    alpha = _check_alpha(alpha)
    counts = np.asarray(counts, dtype=np.float64).ravel()
    if counts.size == 0:
        raise ValueError("entropy() needs at least one count; no states were recorded")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("entropy() needs finite, non-negative counts")
    counts = counts[counts > 0]
    if counts.size == 0:
        raise ValueError("entropy() needs at least one positive count; no states were recorded")
    p = counts / counts.sum()
    if alpha == 0:
        value = math.log2(p.size)
    elif alpha == 1:
        value = -float(np.sum(p * np.log2(p)))
    elif math.isinf(alpha):
        value = -math.log2(float(p.max()))
    else:
        value = math.log2(float(np.sum(p**alpha))) / (1.0 - alpha)
    return max(value, 0.0)


def network_efficiency(efficiencies) -> float:
    """Geometric mean of layer efficiencies.

    ``efficiencies`` is a list of floats or anything with ``efficiency_layers``
    (a Keras model, a torch module or an ONNX efficiency model), whose layers'
    ``efficiency()`` are used. Unlike TensorState 0.4, which returned None with
    a warning, an empty list raises ``ValueError``.
    """
    layers = getattr(efficiencies, "efficiency_layers", None)
    if layers is not None:
        values = [layer.efficiency() for layer in layers]
    elif isinstance(efficiencies, Iterable) and not isinstance(efficiencies, (str, bytes)):
        values = list(efficiencies)
    else:
        raise TypeError(
            "network_efficiency() takes a list of floats or a model with efficiency_layers "
            f"(from build_efficiency_model), got {type(efficiencies).__name__}"
        )
    if not values:
        raise ValueError(
            "network_efficiency() got no efficiencies; attach probes with build_efficiency_model "
            "and run data through the model first"
        )
    array = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError(f"efficiencies must be finite and >= 0, got {values}")
    if np.any(array == 0):
        return 0.0
    return float(np.exp(np.mean(np.log(array))))


def aIQ(net_efficiency: float, accuracy: float, weight: int) -> float:  # noqa: N802 (reference name)
    """Artificial intelligence quotient: ``(net_efficiency * accuracy**weight) ** (1/(weight+1))``.

    ``weight`` is an int >= 1; larger values weigh accuracy more.
    """
    if isinstance(weight, bool) or not isinstance(weight, Integral) or weight < 1:
        raise ValueError(f"aIQ weight must be an int >= 1, got {weight!r}")
    for name, value in (("net_efficiency", net_efficiency), ("accuracy", accuracy)):
        if isinstance(value, bool) or not isinstance(value, Real) or not 0 <= value <= 1:
            raise ValueError(f"aIQ {name} must be a number in [0, 1], got {value!r}")
    return float((net_efficiency * accuracy**weight) ** (1.0 / (weight + 1)))
