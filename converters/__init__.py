"""Converters from training frameworks to ONNX.

- :func:`from_torch` (``torch.nn.Module`` -> ``onnx.ModelProto``), in
  :mod:`tensorstate_onnx.converters.torch_export`; needs the ``torch`` extra.
- :func:`from_keras` (Keras 3 model -> ``onnx.ModelProto``), in
  :mod:`tensorstate_onnx.converters.keras_export`; needs the ``keras`` extra.

Both keep every layer's output a tensor of its own (no BatchNorm folded into a
probed convolution), give the inputs and outputs a dynamic batch axis, and keep
the framework names in the node names or metadata so that ``attach_to`` can name
layers. Importing this package imports no framework: the functions are loaded
on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = ["from_keras", "from_torch"]

_LAZY = {
    "from_torch": "tensorstate_onnx.converters.torch_export",
    "from_keras": "tensorstate_onnx.converters.keras_export",
}

if TYPE_CHECKING:  # pragma: no cover
    from .keras_export import from_keras
    from .torch_export import from_torch


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
