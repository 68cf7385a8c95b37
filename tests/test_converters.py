"""Tests of the framework -> ONNX converters (from_torch, from_keras)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tempfile
from collections import Counter

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _dims(value) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _meta(node) -> dict:
    return {prop.key: prop.value for prop in node.metadata_props}


def test_importing_the_package_imports_no_framework():
    code = (
        "import sys, tensorstate_onnx, tensorstate_onnx.converters as c\n"
        "assert set(c.__all__) == {'from_torch', 'from_keras'}\n"
        "loaded = [m for m in ('torch', 'tensorflow', 'keras', 'tf2onnx') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- torch


@pytest.fixture(scope="module")
def torch_mobilenet(torch):
    from models.torch_models import MobileNetV2Small

    torch.manual_seed(0)
    model = MobileNetV2Small().eval()
    for module in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_()
    return model


@pytest.fixture(scope="module")
def torch_exports(torch, torch_mobilenet):
    from tensorstate_onnx.converters import from_torch

    example = torch.zeros(1, 3, 96, 96)
    return {dynamo: from_torch(torch_mobilenet, example, dynamo=dynamo) for dynamo in (True, False)}


@pytest.mark.parametrize("dynamo", [True, False])
def test_from_torch_keeps_batchnorm_and_a_dynamic_batch(torch, torch_mobilenet, torch_exports, dynamo):
    model = torch_exports[dynamo]
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["Conv"] == 22 and ops["BatchNormalization"] == 22  # nothing folded
    assert ops["Add"] == 3
    assert model.opset_import[0].version == 18 or any(o.version == 18 for o in model.opset_import if o.domain == "")
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "x"
    assert _dims(inp) == ["batch", 3, 96, 96] and _dims(out) == ["batch", 10]
    session = _session(model)
    for n in (1, 5):
        x = torch.randn(n, 3, 96, 96, generator=torch.Generator().manual_seed(n))
        (got,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, torch_mobilenet(x).numpy(), atol=1e-4)


@pytest.mark.parametrize("dynamo", [True, False])
def test_from_torch_records_module_names_and_classes(torch_exports, dynamo):
    model = torch_exports[dynamo]
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    scopes = [ast.literal_eval(_meta(node)["pkg.torch.onnx.name_scopes"]) for node in convs]
    classes = [ast.literal_eval(_meta(node)["pkg.torch.onnx.class_hierarchy"]) for node in convs]
    assert scopes[0][:4] == ["", "features", "features.0", "features.0.0"]
    assert scopes[1][:6] == ["", "features", "features.1", "features.1.conv", "features.1.conv.0", "features.1.conv.0.0"]
    assert scopes[2][:5] == ["", "features", "features.1", "features.1.conv", "features.1.conv.1"]
    assert all(c[len(s) - 2].endswith("Conv2d") for s, c in zip(scopes, classes, strict=True))
    if not dynamo:
        assert convs[1].name == "/features/features.1/conv/conv.0/conv.0.0/Conv"


def test_from_torch_writes_only_the_path_it_is_given(torch, tmp_path, monkeypatch):
    from tensorstate_onnx.converters import from_torch
    from models.torch_models import LeNet5

    work, scratch = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    module = LeNet5().train()
    for dynamo in (True, False):
        model = from_torch(module, torch.zeros(2, 1, 28, 28), dynamo=dynamo)
        assert isinstance(model, onnx.ModelProto)
        assert module.training  # the mode is restored
        assert list(work.iterdir()) == [] and list(scratch.iterdir()) == []
    target = tmp_path / "out" / "lenet.onnx"
    model = from_torch(module, (torch.zeros(1, 1, 28, 28),), path=target, input_names=["image"])
    assert sorted(p.name for p in target.parent.iterdir()) == ["lenet.onnx"]
    saved = onnx.load(str(target))
    assert [i.name for i in saved.graph.input] == ["image"]
    assert [n.op_type for n in saved.graph.node] == [n.op_type for n in model.graph.node]
    assert Counter(n.op_type for n in model.graph.node)["BatchNormalization"] == 3


def test_from_torch_hooks_record_nothing_during_export(torch):
    from tensorstate_onnx.converters import from_torch
    from models.torch_models import LeNet5
    from tensorstate_onnx.torch_capture import attach_hooks

    module = attach_hooks(LeNet5().eval(), ["Conv2d"])
    for dynamo in (True, False):
        from_torch(module, torch.zeros(2, 1, 28, 28), dynamo=dynamo)
    assert [h.state_count for h in module.efficiency_layers] == [0, 0, 0]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_from_torch_several_inputs_keywords_and_outputs(torch, dynamo):
    from tensorstate_onnx.converters import from_torch

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 3)
            self.b = torch.nn.Linear(5, 3)

        def forward(self, x, y=None):
            return self.a(x) + self.b(y), self.a(x)

    module = TwoHeads().eval()
    x, y = torch.randn(6, 4), torch.randn(6, 5)
    with torch.no_grad():
        expected = [t.numpy() for t in module(x, y)]
    for example in ((torch.zeros(1, 4), torch.zeros(1, 5)), {"y": torch.zeros(2, 5), "x": torch.zeros(2, 4)}):
        model = from_torch(module, example, dynamo=dynamo)
        assert [i.name for i in model.graph.input] == ["x", "y"]
        assert all(_dims(o)[0] == "batch" for o in model.graph.output)
        got = _session(model).run(None, {"x": x.numpy(), "y": y.numpy()})
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, atol=1e-5)


def test_from_torch_bad_input(torch):
    from tensorstate_onnx.converters import from_torch
    from models.torch_models import LeNet5

    with pytest.raises(ValueError, match="example_inputs"):
        from_torch(LeNet5())
    with pytest.raises(ValueError, match="example_inputs"):
        from_torch(LeNet5(), ())
    with pytest.raises(TypeError, match="example_inputs"):
        from_torch(LeNet5(), "image")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        from_torch(object(), torch.zeros(1, 1, 28, 28))

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # Python control flow on data: torch.export cannot follow it
                return x * 2
            return x

    with pytest.raises(ValueError, match="could not export DataDependent") as info:
        from_torch(DataDependent(), torch.randn(2, 3))
    message = str(info.value)
    assert "data-dependent" in message and "dynamo=False" in message
    assert info.value.__cause__ is not None


# --------------------------------------------------------------------------- keras


def _randomize_batchnorm(keras, model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape), rng.normal(size=beta.shape),
                rng.normal(size=mean.shape) * 0.1, rng.uniform(0.5, 2.0, var.shape),
            ])  # fmt: skip


@pytest.fixture(scope="module")
def keras_models(keras):
    from models.keras_models import lenet5, lenet5_sequential, mobilenet_v2_small

    keras.utils.set_random_seed(0)
    models = {"lenet5": lenet5(), "lenet5_sequential": lenet5_sequential(), "mobilenet": mobilenet_v2_small()}
    for model in models.values():
        _randomize_batchnorm(keras, model)
    return models


@pytest.fixture(scope="module")
def keras_exports(keras_models):
    from tensorstate_onnx.converters import from_keras

    return {name: from_keras(model) for name, model in keras_models.items()}


@pytest.mark.parametrize("name", ["lenet5", "lenet5_sequential", "mobilenet"])
def test_from_keras_converts_with_a_dynamic_batch(keras_models, keras_exports, name):
    keras_model, model = keras_models[name], keras_exports[name]
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and _dims(inp)[0] == "batch" and _dims(out) == ["batch", 10]
    session = _session(model)
    shape = tuple(keras_model.inputs[0].shape[1:])
    for n in (1, 6):
        x = np.random.default_rng(n).normal(size=(n, *shape)).astype(np.float32)
        (got,) = session.run(None, {"input": x})
        np.testing.assert_allclose(got, keras_model.predict(x, verbose=0), atol=1e-4)


def test_from_keras_keeps_layer_names_and_every_convolution(keras_models, keras_exports):
    from tensorstate_onnx.converters.keras_export import LAYER_CLASS_KEY, LAYER_NAME_KEY

    model = keras_exports["mobilenet"]
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    assert len(convs) == 22
    conv_layers = {_meta(node)[LAYER_NAME_KEY] for node in convs}
    expected = {layer.name for layer in keras_models["mobilenet"].layers
                if type(layer).__name__ in ("Conv2D", "DepthwiseConv2D")}  # fmt: skip
    assert conv_layers == expected  # no BatchNorm folded into a convolution
    assert all("/stem_conv" in node.name for node in convs[:1])
    assert {_meta(node)[LAYER_CLASS_KEY] for node in convs} == {"Conv2D", "DepthwiseConv2D"}
    bn_nodes = {_meta(node).get(LAYER_NAME_KEY) for node in model.graph.node if node.op_type == "Mul"}
    assert len(bn_nodes) == 22  # every BatchNormalization kept its own scale
    lenet = keras_exports["lenet5"]
    assert [n.name for n in lenet.graph.node if n.op_type == "Conv"] == [
        f"lenet5_1/conv{i}_1/convolution" for i in (1, 2, 3)
    ]


def test_from_keras_multiple_inputs_outputs_and_path(keras, tmp_path):
    from tensorstate_onnx.converters import from_keras

    a = keras.Input((8, 8, 3), name="a")
    b = keras.Input((5,), name="b")
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(keras.layers.Conv2D(4, 3, name="conv")(a))
    total = keras.layers.Add(name="total")([pooled, keras.layers.Dense(4, name="dense")(b)])
    model = keras.Model([a, b], [total, pooled], name="two_heads")
    target = tmp_path / "two_heads.onnx"
    proto = from_keras(model, path=target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two_heads.onnx"]
    assert [i.name for i in proto.graph.input] == ["a", "b"]
    assert [o.name for o in proto.graph.output] == ["total", "pool"]
    rng = np.random.default_rng(0)
    xa, xb = rng.normal(size=(3, 8, 8, 3)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
    got = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"]).run(None, {"a": xa, "b": xb})
    for g, e in zip(got, model.predict([xa, xb], verbose=0), strict=True):
        np.testing.assert_allclose(g, e, atol=1e-5)


def test_from_keras_of_an_efficiency_model_exports_identities(keras, keras_models):
    from tensorstate_onnx.converters import from_keras
    from tensorstate_onnx.keras_capture import build_keras_efficiency_model

    probed = build_keras_efficiency_model(keras_models["lenet5"], ["Conv2D"])
    proto = from_keras(probed)
    assert [c.state_count for c in probed.efficiency_layers] == [0, 0, 0]
    x = np.random.default_rng(1).normal(size=(4, 28, 28, 1)).astype(np.float32)
    (got,) = _session(proto).run(None, {"input": x})
    np.testing.assert_allclose(got, keras_models["lenet5"].predict(x, verbose=0), atol=1e-4)


def test_from_keras_bad_input(keras):
    import tensorflow as tf

    from tensorstate_onnx.converters import from_keras

    with pytest.raises(TypeError, match="keras.Model"):
        from_keras(object())
    with pytest.raises(ValueError, match="not built"):
        from_keras(keras.Sequential([keras.layers.Dense(2)]))

    class HostOnly(keras.layers.Layer):
        def call(self, x):
            y = tf.numpy_function(lambda a: a * 2, [x], Tout=tf.float32, stateful=False)
            y.set_shape(x.shape)
            return y

        def compute_output_spec(self, x):
            return keras.KerasTensor(x.shape, x.dtype)

    inputs = keras.Input((4,), name="x")
    model = keras.Model(inputs, keras.layers.Dense(3)(HostOnly()(inputs)), name="host_only")
    with pytest.raises(ValueError, match="PyFuncStateless"):
        from_keras(model)
