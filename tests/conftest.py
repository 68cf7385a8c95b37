"""Fixtures shared by the test modules."""

import numpy as np
import onnx
import pytest

from tensorstate_onnx import demo


@pytest.fixture(scope="session")
def keras():
    """Keras 3 on the TensorFlow backend with tf2onnx: what ``from_keras`` converts through."""
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("from_keras converts through TensorFlow")
    return keras


@pytest.fixture(scope="session")
def torch():
    """PyTorch (the ``torch`` extra); tests that need it skip without it."""
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def demo_model() -> onnx.ModelProto:
    """The bundled LeNet-5 digits model (a fresh copy per test module)."""
    return onnx.load(str(demo.model_path()))


@pytest.fixture(scope="session")
def demo_data() -> tuple[np.ndarray, np.ndarray]:
    """The bundled held-out digits: images ``(N, 1, 28, 28)`` and labels."""
    return demo.load_test_data()
