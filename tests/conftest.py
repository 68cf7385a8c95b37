"""Fixtures shared by the test modules."""

import importlib.util
import sys

import numpy as np
import onnx
import onnxruntime as ort
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


# torchvision's C++ operators ship built against its own CUDA torch; with the CPU
# torch they do not load, and its import then fails registering fake kernels of
# these two operators. The model classes never call them: declaring the schemas
# (no kernel) lets the import finish, and any real use of them still fails loudly.
_TORCHVISION_OPS = {
    "torchvision::nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "torchvision::qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


@pytest.fixture(scope="session")
def torchvision(torch):
    """torchvision's model classes (a test-only dependency), on the CPU torch too."""
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed (the test extra installs it)")
    try:
        import torchvision
    except RuntimeError as exc:
        if "torchvision::nms" not in str(exc):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        for op, schema in _TORCHVISION_OPS.items():
            torch.library.define(op, schema)
        import torchvision
    return torchvision


@pytest.fixture(scope="session")
def transformers(torchvision):
    """Hugging Face transformers (a test-only dependency); it imports torchvision when
    it finds it, so that import is made to work first."""
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def demo_model() -> onnx.ModelProto:
    """The bundled LeNet-5 digits model (a fresh copy per test module)."""
    return onnx.load(str(demo.model_path()))


@pytest.fixture(scope="session")
def demo_data() -> tuple[np.ndarray, np.ndarray]:
    """The bundled held-out digits: images ``(N, 1, 28, 28)`` and labels."""
    return demo.load_test_data()


@pytest.fixture(scope="session")
def ort_session():
    """Returns ``make(model) -> onnxruntime.InferenceSession`` on the CPU provider."""

    def make(model: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])

    return make


@pytest.fixture(scope="session")
def onnx_dims():
    """Returns ``dims(value_info) -> [int or str]``: its shape, symbolic dimensions by name."""

    def dims(value: onnx.ValueInfoProto) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    return dims


@pytest.fixture(scope="session")
def node_metadata():
    """Returns ``metadata(node) -> dict``: an ONNX node's ``metadata_props``."""

    def metadata(node: onnx.NodeProto) -> dict:
        return {prop.key: prop.value for prop in node.metadata_props}

    return metadata


@pytest.fixture(scope="session")
def fixed_batch_relu():
    """Returns ``make(batch) -> ModelProto``: a Relu over ``x [batch, 4]``, its batch axis fixed."""
    from onnx import helper

    def make(batch: int) -> onnx.ModelProto:
        graph = helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"], name="relu")], "fixed_batch",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 4])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 4])],
        )  # fmt: skip
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    return make


@pytest.fixture(scope="session")
def shape_math_model() -> onnx.ModelProto:
    """x [N, 3, 4, 4] -> Relu -> Add (of zeros of x's shape); Shape -> Cast to float -> Mul;
    Relu -> Cast to int: two probe-able tensors among shape arithmetic and an integer cast."""
    from onnx import TensorProto, helper

    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="relu"),
            helper.make_node("Shape", ["x"], ["s"], name="shape"),
            helper.make_node("Cast", ["s"], ["sf"], name="to_float", to=TensorProto.FLOAT),
            helper.make_node("Mul", ["sf", "two"], ["sf2"], name="scale"),
            helper.make_node("ConstantOfShape", ["s"], ["zeros"], name="zeros",
                             value=helper.make_tensor("v", TensorProto.FLOAT, [1], [0.0])),
            helper.make_node("Add", ["r", "zeros"], ["y"], name="add"),
            helper.make_node("Cast", ["r"], ["ri"], name="to_int", to=TensorProto.INT64),
        ],
        "shapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, 4, 4]),
         helper.make_tensor_value_info("sf2", TensorProto.FLOAT, [4]),
         helper.make_tensor_value_info("ri", TensorProto.INT64, ["N", 3, 4, 4])],
        initializer=[two],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
