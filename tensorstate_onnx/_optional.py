"""Imports of optional dependencies, with the extra that installs them.

The core install has neither TensorFlow, PyTorch, Dask nor matplotlib; the
modules that need one import it through :func:`import_optional` when first
used, so a missing one says which ``pip install`` brings it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtraError


def install_hint(extra: str) -> str:
    """The pip command that installs the optional ``extra`` of this package."""
    return f"pip install 'tensorstate-onnx[{extra}]'"


def import_optional(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` saying that ``purpose`` needs ``extra``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{purpose} needs {module}, which is not installed; install it with: {install_hint(extra)}"
        ) from exc
