"""Exception types raised for bad input.

Every error a user can cause derives from ``ValueError`` or ``TypeError`` so that
plain ``except ValueError`` keeps working, and the CLI maps all of them to exit
code 2. The subclasses let callers tell the cases apart.
"""

from __future__ import annotations


class ModelFileError(ValueError):
    """An ONNX model file is missing, unreadable, corrupt or invalid."""


class ProbeMatchError(ValueError):
    """``attach_to`` matched no layer, module or node of the model."""


class ModelInputError(ValueError):
    """Data given to a model has the wrong name, shape or dtype, or is empty."""


class StorageExistsError(FileExistsError):
    """A state store already exists where a new one was asked for."""


class ProviderError(ValueError):
    """An onnxruntime execution provider was unknown or unavailable."""


class NoStatesError(ValueError):
    """A statistic was asked of a probe that has not recorded any state."""
