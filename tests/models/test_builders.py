"""Tests of the reference models (ONNX builder, torch, Keras) and the bundled demo."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from models import (
    MOBILENET_V2_SMALL_BLOCKS,
    MOBILENET_V2_SMALL_LAST,
    MOBILENET_V2_SMALL_STEM,
)
from models.onnx_models import mobilenet_v2_small_onnx

# Blocks whose input and output shapes agree, hence with a residual Add.
_BLOCK_INPUTS = [MOBILENET_V2_SMALL_STEM] + [c for _, c, _ in MOBILENET_V2_SMALL_BLOCKS[:-1]]
N_SKIPS = sum(
    s == 1 and c_in == c_out
    for c_in, (_, c_out, s) in zip(_BLOCK_INPUTS, MOBILENET_V2_SMALL_BLOCKS, strict=True)
)
# conv1, conv2, conv3 of LeNet-5: (channels, height, width) of their outputs.
LENET_CONV_SHAPES = {"conv1": (20, 24, 24), "conv2": (50, 8, 8), "conv3": (100, 1, 1)}


# --------------------------------------------------------------------------- ONNX builder


@pytest.fixture(scope="module")
def mobilenet_onnx() -> onnx.ModelProto:
    return mobilenet_v2_small_onnx()


def test_onnx_mobilenet_passes_checker_and_has_expected_structure(mobilenet_onnx):
    onnx.checker.check_model(mobilenet_onnx, full_check=True)
    ops = Counter(n.op_type for n in mobilenet_onnx.graph.node)
    assert ops["Conv"] > 10
    assert ops["Conv"] == ops["BatchNormalization"] == 22
    assert ops["Add"] == N_SKIPS == 3
    assert ops["Clip"] == 15
    assert ops["GlobalAveragePool"] == ops["Flatten"] == ops["Gemm"] == 1
    depthwise = [n for n in mobilenet_onnx.graph.node
                 if n.op_type == "Conv" and onnx.helper.get_node_attr_value(n, "group") > 1]
    assert len(depthwise) == len(MOBILENET_V2_SMALL_BLOCKS)
    names = [n.name for n in mobilenet_onnx.graph.node]
    assert len(set(names)) == len(names)
    assert {"features.0.0/Conv", "features.1.conv.0.0/Conv", "features.3/Add",
            "features.8.0/Conv", "classifier/Gemm"} <= set(names)
    assert mobilenet_onnx.opset_import[0].version == 17


def test_onnx_mobilenet_io_signature(mobilenet_onnx):
    (inp,), (out,) = mobilenet_onnx.graph.input, mobilenet_onnx.graph.output
    assert inp.name == "input" and out.name == "logits"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    in_dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    out_dims = [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim]
    assert in_dims == ["N", 3, 96, 96]
    assert out_dims == ["N", 10]
    fixed = mobilenet_v2_small_onnx(batch=4)
    assert [d.dim_value for d in fixed.graph.input[0].type.tensor_type.shape.dim] == [4, 3, 96, 96]


@pytest.mark.parametrize("n", [1, 4])
def test_onnx_mobilenet_runs_in_onnxruntime(mobilenet_onnx, n, ort_session):
    x = np.random.default_rng(n).normal(size=(n, 3, 96, 96)).astype(np.float32)
    (logits,) = ort_session(mobilenet_onnx).run(None, {"input": x})
    assert logits.shape == (n, 10)
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()
    # Activations neither vanish nor explode: logits have a sensible spread.
    assert 0.05 < logits.std() < 100


def test_onnx_mobilenet_activations_fire_about_half_the_time(mobilenet_onnx, ort_session):
    probed = onnx.ModelProto()
    probed.CopyFrom(mobilenet_onnx)
    clips = [n.output[0] for n in probed.graph.node if n.op_type == "Clip"]
    probed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(c) for c in clips)
    x = np.random.default_rng(0).normal(size=(2, 3, 96, 96)).astype(np.float32)
    outputs = ort_session(probed).run(clips, {"input": x})
    for name, value in zip(clips, outputs, strict=True):
        assert 0.2 < (value > 0).mean() < 0.8, name
        assert (value >= 0).all() and (value <= 6).all(), name


def test_onnx_mobilenet_is_deterministic_per_seed(mobilenet_onnx):
    assert mobilenet_v2_small_onnx(seed=0).SerializeToString() == mobilenet_onnx.SerializeToString()
    other = {t.name: t for t in mobilenet_v2_small_onnx(seed=1).graph.initializer}
    stem_0 = next(t for t in mobilenet_onnx.graph.initializer if t.name == "features.0.0.weight")
    assert not np.array_equal(onnx.numpy_helper.to_array(stem_0),
                              onnx.numpy_helper.to_array(other["features.0.0.weight"]))


def test_onnx_mobilenet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="opset"):
        mobilenet_v2_small_onnx(opset=10)
    with pytest.raises(ValueError, match="batch"):
        mobilenet_v2_small_onnx(batch=0)


def test_models_package_imports_no_framework():
    code = (
        "import sys, models, models.onnx_models, "
        "tensorstate_onnx.demo; "
        "print(sorted(m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# --------------------------------------------------------------------------- torch


def test_torch_lenet5_shapes_and_state_counts():
    torch = pytest.importorskip("torch")
    from models.torch_models import lenet5

    model = lenet5().eval()
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        getattr(model, name).register_forward_hook(
            lambda mod, inp, out, name=name: shapes.__setitem__(name, tuple(out.shape))
        )
        for name in LENET_CONV_SHAPES
    ]
    with torch.no_grad():
        logits = model(torch.zeros(2, 1, 28, 28))
    for h in handles:
        h.remove()
    assert tuple(logits.shape) == (2, 10)
    assert {k: v[1:] for k, v in shapes.items()} == LENET_CONV_SHAPES
    assert all(v[0] == 2 for v in shapes.values())
    # One state per instance and spatial position (channels are the neurons).
    states = {k: 10_000 * h * w for k, (_, h, w) in LENET_CONV_SHAPES.items()}
    assert states == {"conv1": 5_760_000, "conv2": 640_000, "conv3": 10_000}
    for name in ("elu1", "elu2", "elu3", "bn1", "bn2", "bn3", "pool1", "pool2", "dense"):
        assert isinstance(getattr(model, name), torch.nn.Module)


def test_torch_mobilenet_v2_small_shapes():
    torch = pytest.importorskip("torch")
    from models.torch_models import InvertedResidual, mobilenet_v2_small

    model = mobilenet_v2_small(num_classes=10).eval()
    with torch.no_grad():
        features = model.features(torch.zeros(2, 3, 96, 96))
        logits = model(torch.randn(2, 3, 96, 96))
    assert tuple(features.shape) == (2, MOBILENET_V2_SMALL_LAST, 6, 6)
    assert tuple(logits.shape) == (2, 10)
    assert torch.isfinite(logits).all()
    blocks = [m for m in model.features if isinstance(m, InvertedResidual)]
    assert len(blocks) == len(MOBILENET_V2_SMALL_BLOCKS)
    assert sum(b.use_residual for b in blocks) == N_SKIPS
    assert isinstance(model.classifier, torch.nn.Linear)


# --------------------------------------------------------------------------- keras


@pytest.mark.parametrize("builder", ["lenet5", "lenet5_sequential"])
def test_keras_lenet5_shapes(builder):
    keras = pytest.importorskip("keras")
    from models import keras_models

    model = getattr(keras_models, builder)()
    logits = model(np.zeros((2, 28, 28, 1), np.float32), training=False)
    assert tuple(logits.shape) == (2, 10)
    for name, (c, h, w) in LENET_CONV_SHAPES.items():
        assert tuple(model.get_layer(name).output.shape) == (None, h, w, c)
    names = {layer.name for layer in model.layers}
    assert {"elu1", "elu2", "elu3", "bn1", "bn2", "bn3", "pool1", "pool2"} <= names
    assert {"flatten", "dense"} <= names
    assert isinstance(model, keras.Sequential) == (builder == "lenet5_sequential")


def test_keras_mobilenet_v2_small_shapes():
    pytest.importorskip("keras")
    from models.keras_models import mobilenet_v2_small

    model = mobilenet_v2_small(num_classes=10)
    logits = model(np.random.default_rng(0).normal(size=(2, 96, 96, 3)).astype(np.float32),
                   training=False)
    assert tuple(logits.shape) == (2, 10)
    assert np.isfinite(np.asarray(logits)).all()
    last = model.get_layer("last_relu6").output
    assert tuple(last.shape) == (None, 6, 6, MOBILENET_V2_SMALL_LAST)
    kinds = Counter(type(layer).__name__ for layer in model.layers)
    assert kinds["Add"] == N_SKIPS
    assert kinds["DepthwiseConv2D"] == len(MOBILENET_V2_SMALL_BLOCKS)


def test_torch_and_keras_models_have_equal_parameter_counts():
    torch = pytest.importorskip("torch")
    pytest.importorskip("keras")
    from models import keras_models, torch_models

    def torch_count(model: torch.nn.Module) -> int:
        # Keras counts BatchNorm moving statistics as (non-trainable) weights.
        buffers = sum(b.numel() for n, b in model.named_buffers() if "running" in n)
        return sum(p.numel() for p in model.parameters()) + buffers

    assert torch_count(torch_models.lenet5()) == keras_models.lenet5().count_params()
    assert torch_count(torch_models.mobilenet_v2_small()) == \
        keras_models.mobilenet_v2_small().count_params()


# --------------------------------------------------------------------------- demo


def test_demo_model_is_accurate_on_its_test_data():
    from tensorstate_onnx.demo import load_test_data, model_path

    path = model_path()
    assert path.is_file() and path.suffix == ".onnx"
    x, y = load_test_data()
    assert len(x) == len(y) > 0
    assert x.dtype == np.float32 and x.shape[1:] == (1, 28, 28)
    assert y.dtype == np.int64 and set(np.unique(y)) == set(range(10))
    assert 0.0 <= x.min() and x.max() <= 1.0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": x})
    assert logits.shape == (len(x), 10)
    assert (logits.argmax(axis=1) == y).mean() >= 0.95


def test_demo_model_keeps_batchnorm_and_module_names():
    from tensorstate_onnx.demo import model_path

    model = onnx.load(model_path())
    onnx.checker.check_model(model)
    names = [n.name for n in model.graph.node]
    for i in (1, 2, 3):
        assert f"/conv{i}/Conv" in names and f"/bn{i}/BatchNormalization" in names
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == 3
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 28, 28]
