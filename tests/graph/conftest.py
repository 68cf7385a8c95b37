"""Fixtures shared by the tests of the ONNX rewriter (tensorstate_onnx.graph).

Helpers that several test modules call (running a model, random initializers,
packing bits the numpy way, comparing recorded states) are fixtures that return
the function, because test modules cannot import one another.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(1234)


def _init(name: str, *shape: int) -> onnx.TensorProto:
    """A float32 initializer ``name`` of standard normal values."""
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _run(
    model: onnx.ModelProto | str, feeds: dict, level=ort.GraphOptimizationLevel.ORT_ENABLE_ALL
) -> dict[str, np.ndarray]:
    """All outputs of ``model`` under onnxruntime CPU at optimization ``level``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [out.name for out in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def _cnn(opset: int = 17) -> onnx.ModelProto:
    """Conv->BN->Relu(unnamed)->[1x1 Conv + skip Add]->MaxPool->Flatten->Gemm, and a
    Transpose->Sigmoid(unnamed)->MatMul branch off the Relu."""
    nodes = [
        helper.make_node("Conv", ["x", "W", "B"], ["c"], name="conv"),
        helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Conv", ["r", "W2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["r", "c2"], ["skip"], name="add"),
        helper.make_node("MaxPool", ["skip"], ["p"], name="pool", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "Wfc", "Bfc"], ["logits"], name="fc", transB=1),
        helper.make_node("Transpose", ["r"], ["t"], name="tr", perm=[0, 2, 3, 1]),
        helper.make_node("Sigmoid", ["t"], ["sg"]),
        helper.make_node("MatMul", ["sg", "Wmm"], ["branch"], name="mm"),
    ]
    var = numpy_helper.from_array(RNG.uniform(0.5, 2.0, 6).astype(np.float32), "v")
    shapes = {"W": (6, 3, 3, 3), "B": (6,), "s": (6,), "b": (6,), "m": (6,),
              "W2": (6, 6, 1, 1), "Wfc": (10, 54), "Bfc": (10,), "Wmm": (6, 5)}  # fmt: skip
    inits = [_init(name, *shape) for name, shape in shapes.items()] + [var]
    g = helper.make_graph(
        nodes, "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
         helper.make_tensor_value_info("branch", TensorProto.FLOAT, ["N", 6, 6, 5])],
        inits,
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _packbits(x: np.ndarray, axis: int) -> np.ndarray:
    """The ``> 0`` states of ``x`` along ``axis``, bit-packed little-endian (as the engine packs)."""
    channels_last = np.moveaxis(x, axis, -1)
    return np.packbits(channels_last.reshape(-1, x.shape[axis]) > 0, axis=-1, bitorder="little")


def _numpy_counts(x: np.ndarray, axis: int) -> dict[bytes, int]:
    """An independent count of the states of ``x`` with neurons on ``axis``: ``x > 0``
    moved channels-last, ``np.packbits(..., bitorder="little")``, ``np.unique`` rows.
    A rank-1 ``[N]`` tensor is read as ``[N, 1]``."""
    x = np.asarray(x)
    if x.ndim == 1:
        x = x[:, None]
    rows, counts = np.unique(_packbits(x, axis), axis=0, return_counts=True)
    return {row.tobytes(): int(n) for row, n in zip(rows, counts)}


def _state_counts(capture) -> dict[bytes, int]:
    """A capture's states as {state id: count}."""
    return dict(zip(capture.state_ids(), capture.counts().tolist()))


def _assert_same_states(native, probe, exact: bool = False) -> None:
    """Assert that a native capture and an ONNX probe recorded the same states.

    The totals and neuron counts must be equal; unless ``exact``, states flipped by
    float rounding right at zero (the runtimes order operations differently) may
    move between state ids, fewer than 1e-4 of them (as in test_parity.py).
    """
    totals = (probe.state_count, probe.n_neurons)
    assert totals == (native.state_count, native.n_neurons), probe.name
    left, right = _state_counts(native), _state_counts(probe)
    if exact:
        assert left == right, probe.name
        return
    moved = sum(abs(left.get(k, 0) - right.get(k, 0)) for k in left.keys() | right.keys()) // 2
    assert moved < 1e-4 * native.state_count, (probe.name, moved)


def _tf2onnx_style(producer: str) -> onnx.ModelProto:
    """A 1-channel NHWC image reshaped to NCHW for a Conv (as tf2onnx converts one), and
    a rank-3 sequence read by MatMul (a Dense layer)."""
    shape = numpy_helper.from_array(np.array([-1, 1, 6, 6], np.int64), "shape")
    nodes = [
        helper.make_node("Reshape", ["img", "shape"], ["nchw"], name="to_nchw"),
        helper.make_node("Conv", ["nchw", "W"], ["c"], name="conv"),
        helper.make_node("MatMul", ["seq", "Wd"], ["d"], name="dense"),
    ]
    g = helper.make_graph(
        nodes, "tf",
        [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 6, 6, 1]),
         helper.make_tensor_value_info("seq", TensorProto.FLOAT, ["N", 4, 8])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 2, 4, 4]),
         helper.make_tensor_value_info("d", TensorProto.FLOAT, ["N", 4, 5])],
        [shape, _init("W", 2, 1, 3, 3), _init("Wd", 8, 5)],
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name=producer)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def initializer():
    """``initializer(name, *shape)``: see :func:`_init`."""
    return _init


@pytest.fixture(scope="session")
def run():
    """``run(model, feeds, level=ORT_ENABLE_ALL)``: every output of a model (proto or
    path) under onnxruntime CPU, by name."""
    return _run


@pytest.fixture(scope="session")
def make_cnn():
    """``make_cnn(opset=17)``: a fresh copy of the small CNN of the ``cnn`` fixture."""
    return _cnn


@pytest.fixture(scope="module")
def cnn() -> onnx.ModelProto:
    """The small CNN of :func:`_cnn` (opset 17), shared by a test module; tests must not modify it."""
    return _cnn()


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    """A batch of 4 inputs for ``cnn``."""
    return RNG.standard_normal((4, 3, 8, 8)).astype(np.float32)


@pytest.fixture(scope="session")
def packbits():
    """``packbits(x, axis)``: see :func:`_packbits`."""
    return _packbits


@pytest.fixture(scope="session")
def numpy_counts():
    """``numpy_counts(x, axis)``: see :func:`_numpy_counts`."""
    return _numpy_counts


@pytest.fixture(scope="session")
def state_counts():
    """``state_counts(capture)``: a capture's states as {state id: count}."""
    return _state_counts


@pytest.fixture(scope="session")
def assert_same_states():
    """``assert_same_states(native, probe, exact=False)``: see :func:`_assert_same_states`."""
    return _assert_same_states


@pytest.fixture(scope="session")
def tf2onnx_style():
    """``tf2onnx_style(producer)``: see :func:`_tf2onnx_style`."""
    return _tf2onnx_style


@pytest.fixture(scope="module")
def keras_lenet(keras):
    """The Keras LeNet-5, its from_keras export and a batch of (28, 28, 1) images."""
    from tensorstate_onnx.converters import from_keras
    from models.keras_models import lenet5

    keras.utils.set_random_seed(0)
    model = lenet5()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = from_keras(model)
    x = np.random.default_rng(3).normal(size=(64, 28, 28, 1)).astype(np.float32)
    return model, exported, x
