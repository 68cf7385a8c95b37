"""The neuron-axis rule's pieces that every front end shares (see DESIGN §1).

Each front end works out on which axis of a probed tensor the neurons lie (by
module type, layer or op type and how the tensor was produced); this module
holds what is the same everywhere: the view of rank-1 tensors, the
``channel_axes`` override (keys and ranges), the warning for a guessed axis and
the refusal of integer and bool tensors. It imports no framework.

A rank-1 tensor ``[N]`` is one neuron per sample: it is read as ``[N, 1]`` with
its neurons on axis 1, so ``channel_axis`` is 1 for it and overrides are
checked against that rank-2 view.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np

from .errors import ChannelAxisError, GuessedAxisWarning, OptionTypeError, ProbeDtypeError
from .patterns import preview

__all__ = [
    "check_override_keys",
    "checked_override",
    "checked_type",
    "dtype_error",
    "is_float_dtype_name",
    "view_rank",
    "warn_guessed",
]

#: Element type names a probe may watch (numpy, torch and ONNX spellings).
_FLOAT_NAMES = frozenset({"float16", "float32", "float64", "bfloat16", "half", "float", "double"})


def view_rank(rank: int) -> int:
    """Rank of the tensor the engine sees: a rank-1 ``[N]`` tensor is read as ``[N, 1]``."""
    return 2 if rank == 1 else rank


def is_float_dtype_name(name: str) -> bool:
    """Whether an element type (by name: ``"float32"``, ``"torch.bfloat16"``, ...) is a float."""
    return name.rsplit(".", 1)[-1].lower() in _FLOAT_NAMES


def dtype_error(probe: str, dtype: str) -> ProbeDtypeError:
    """The error for a probe whose tensor is not float (integer ids, bool masks); the
    same words on every path."""
    return ProbeDtypeError(
        f"probe {probe!r} would watch a tensor of type {dtype}; neurons fire on float values (> 0), so "
        "probe a float tensor instead: method='after' of this layer, or another layer "
        "(exclude this one with exclude=[...])"
    )


def checked_type(key: str, axis) -> int:
    """``axis`` as an int; OptionTypeError for anything that is not an integer."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise OptionTypeError(f"channel_axes[{key!r}] must be an int, got {axis!r}")
    return int(axis)


def checked_override(key: str, axis, probe: str, shape) -> int:
    """The override ``axis`` for a probed tensor of ``shape``, made non-negative.

    Raises ChannelAxisError when it is out of range for the tensor's rank (rank-1
    tensors are read as ``[N, 1]``, see :func:`view_rank`).
    """
    axis = checked_type(key, axis)
    rank = view_rank(len(shape))
    if not -rank <= axis < rank:
        raise ChannelAxisError(
            f"channel_axes[{key!r}] = {axis} is out of range for probe {probe!r}, whose "
            f"tensor has shape {tuple(shape)}"
            + (" (read as [N, 1]: one neuron per sample)" if len(shape) == 1 else "")
            + f"; valid axes are {-rank} to {rank - 1}"
        )
    return axis % rank


def check_override_keys(
    overrides: Mapping[str, object], names: Iterable[str], aliases: Iterable[str] = ()
) -> None:
    """Raise ChannelAxisError for ``channel_axes`` keys that name no probe.

    ``names`` are the probe names; ``aliases`` other names the front end accepts
    (layer or module names, ONNX tensor names). A key that names nothing would
    be ignored silently and the probe miscounted.
    """
    names = list(names)
    known = set(names) | set(aliases)
    for key, axis in overrides.items():
        checked_type(key, axis)
    unknown = sorted(str(key) for key in overrides if key not in known)
    if unknown:
        raise ChannelAxisError(
            f"channel_axes keys {unknown} name no probe; key each axis by a probe name "
            f"among: {preview(sorted(names))}"
        )


def warn_guessed(probe: str, shape, axis: int, why: str = "", stacklevel: int = 3) -> None:
    """Warn that ``probe``'s neuron axis is a guess and name the override."""
    reason = f" ({why})" if why else ""
    warnings.warn(
        f"probe {probe!r}: no rule gives the neuron axis of its tensor of shape "
        f"{tuple(shape)}{reason}; the last axis ({axis}) was taken. If the neurons lie on "
        f"another axis, pass channel_axes={{{probe!r}: <axis>}}",
        GuessedAxisWarning,
        stacklevel=stacklevel,
    )
