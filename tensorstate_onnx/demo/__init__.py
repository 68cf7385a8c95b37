"""A small trained model and its held-out data, shipped for demos and tests.

``lenet5_digits.onnx`` is the torch LeNet-5 of
``models/torch_models.py`` in the repository, trained on scikit-learn's 8x8 digits
(upscaled to 28x28) by ``scripts/train_demo.py``; ``digits_test.npz`` holds the
test split it never saw. The files are package data, located through
:mod:`importlib.resources` so that they are found in a regular (non-editable)
install too.
"""

from __future__ import annotations

import pathlib
from importlib import resources

import numpy as np

from ..errors import MissingFileError

__all__ = ["MODEL_FILE", "TEST_DATA_FILE", "load_test_data", "model_path"]

MODEL_FILE = "lenet5_digits.onnx"
TEST_DATA_FILE = "digits_test.npz"


def _resource(name: str) -> pathlib.Path:
    """Filesystem path of a file shipped in this package.

    Packages installed as directories (wheels, editable installs) expose real
    paths; onnxruntime and numpy need one, so a zipped install is not supported.
    """
    path = pathlib.Path(str(resources.files(__name__).joinpath(name)))
    if not path.is_file():
        raise MissingFileError(
            f"demo file {name!r} is missing from {path.parent}; "
            "regenerate it with `python scripts/train_demo.py`"
        )
    return path


def model_path() -> pathlib.Path:
    """Path of the trained LeNet-5 ONNX model.

    Its input ``"input"`` is float32 ``[N, 1, 28, 28]``, its output ``"logits"`` ``[N, 10]``.
    """
    return _resource(MODEL_FILE)


def load_test_data() -> tuple[np.ndarray, np.ndarray]:
    """Held-out digits test set: ``x`` float32 ``[N, 1, 28, 28]`` in [0, 1], ``y`` int64 ``[N]``."""
    with np.load(_resource(TEST_DATA_FILE)) as data:
        return data["x"].astype(np.float32), data["y"].astype(np.int64)
