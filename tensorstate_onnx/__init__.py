"""tensorstate-onnx: neuron-state efficiency and aIQ of Keras, PyTorch and ONNX models.

The public API of TensorState 0.4, plus an ONNX path that analyzes any model
through onnxruntime. Importing this package imports neither TensorFlow nor
PyTorch; their front ends load them when used. The names below are loaded on
first use too (numba, zarr, onnx and onnxruntime take most of a second to
import), so a process that only packs states does not pay for the ONNX path.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    IndexOutOfRangeError,
    ChannelAxisError,
    GuessedAxisWarning,
    MissingExtraError,
    MissingFileError,
    ModelFileError,
    ModelInputError,
    NoStatesError,
    OptionError,
    OptionTypeError,
    PackedStateError,
    ProbeDtypeError,
    ProbeMatchError,
    ProviderError,
    SchedulerConnectionError,
    ShardFailedError,
    StorageExistsError,
    StoreError,
    TensorStateError,
    WorkerBuildError,
)
from .metrics import aIQ, entropy, network_efficiency

if TYPE_CHECKING:
    from .api import build_efficiency_model, reset_efficiency_model
    from .capture import AbstractStateCapture, StateCaptureProbe
    from .engine import StateCounter, pack, unpack
    from .heap import keep_freed_memory
    from .runtime import OnnxEfficiencyModel
    from .store import StateStore

__version__ = "0.1.0"

_LAZY = {
    "build_efficiency_model": "api",
    "reset_efficiency_model": "api",
    "AbstractStateCapture": "capture",
    "StateCaptureProbe": "capture",
    "StateCounter": "engine",
    "pack": "engine",
    "unpack": "engine",
    "keep_freed_memory": "heap",
    "OnnxEfficiencyModel": "runtime",
    "StateStore": "store",
}

__all__ = [
    "AbstractStateCapture",
    "ChannelAxisError",
    "GuessedAxisWarning",
    "IndexOutOfRangeError",
    "MissingExtraError",
    "MissingFileError",
    "ModelFileError",
    "ModelInputError",
    "NoStatesError",
    "OnnxEfficiencyModel",
    "OptionError",
    "OptionTypeError",
    "PackedStateError",
    "ProbeDtypeError",
    "ProbeMatchError",
    "ProviderError",
    "SchedulerConnectionError",
    "ShardFailedError",
    "StateCaptureProbe",
    "StateCounter",
    "StateStore",
    "StorageExistsError",
    "StoreError",
    "TensorStateError",
    "WorkerBuildError",
    "aIQ",
    "build_efficiency_model",
    "entropy",
    "keep_freed_memory",
    "network_efficiency",
    "pack",
    "reset_efficiency_model",
    "unpack",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
