"""Fixtures shared by the test modules."""

import pytest


@pytest.fixture(scope="session")
def keras():
    """Keras 3 on the TensorFlow backend with tf2onnx: what ``from_keras`` converts through."""
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("from_keras converts through TensorFlow")
    return keras
