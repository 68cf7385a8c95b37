"""tensorstate-onnx: neuron-state efficiency and aIQ of Keras, PyTorch and ONNX models.

The public API of TensorState 0.4, plus an ONNX path that analyzes any model
through onnxruntime. Importing this package imports neither TensorFlow nor
PyTorch; their front ends load them when used.
"""

from .api import build_efficiency_model, reset_efficiency_model
from .capture import AbstractStateCapture, StateCaptureProbe
from .engine import StateCounter, pack, unpack
from .errors import (
    ModelFileError,
    ModelInputError,
    NoStatesError,
    ProbeMatchError,
    ProviderError,
    StorageExistsError,
)
from .metrics import aIQ, entropy, network_efficiency
from .runtime import OnnxEfficiencyModel
from .store import StateStore

__version__ = "0.1.0"

__all__ = [
    "AbstractStateCapture",
    "ModelFileError",
    "ModelInputError",
    "NoStatesError",
    "OnnxEfficiencyModel",
    "ProbeMatchError",
    "ProviderError",
    "StateCaptureProbe",
    "StateCounter",
    "StateStore",
    "StorageExistsError",
    "aIQ",
    "build_efficiency_model",
    "entropy",
    "network_efficiency",
    "pack",
    "reset_efficiency_model",
    "unpack",
]
