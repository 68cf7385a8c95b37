"""Tests of from_keras: Keras 3 model -> ONNX through tf2onnx, layer names kept."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def keras_models(keras):
    from models.keras_models import lenet5, lenet5_sequential, mobilenet_v2_small, randomize_batchnorm

    keras.utils.set_random_seed(0)
    models = {"lenet5": lenet5(), "lenet5_sequential": lenet5_sequential(), "mobilenet": mobilenet_v2_small()}
    for model in models.values():
        randomize_batchnorm(model)
    return models


@pytest.fixture(scope="module")
def keras_exports(keras_models):
    from tensorstate_onnx.converters import from_keras

    return {name: from_keras(model) for name, model in keras_models.items()}


@pytest.mark.parametrize("name", ["lenet5", "lenet5_sequential", "mobilenet"])
def test_from_keras_converts_with_a_dynamic_batch(
    keras_models, keras_exports, name, ort_session, onnx_dims
):
    keras_model, model = keras_models[name], keras_exports[name]
    onnx.checker.check_model(model, full_check=True)
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "input" and onnx_dims(inp)[0] == "batch" and onnx_dims(out) == ["batch", 10]
    session = ort_session(model)
    shape = tuple(keras_model.inputs[0].shape[1:])
    for n in (1, 6):
        x = np.random.default_rng(n).normal(size=(n, *shape)).astype(np.float32)
        (got,) = session.run(None, {"input": x})
        np.testing.assert_allclose(got, keras_model.predict(x, verbose=0), atol=1e-4)


def test_from_keras_keeps_layer_names_and_every_convolution(keras_models, keras_exports, node_metadata):
    from tensorstate_onnx.graph.metadata import KERAS_LAYER_CLASS, KERAS_LAYER_NAME

    model = keras_exports["mobilenet"]
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    assert len(convs) == 22
    conv_layers = {node_metadata(node)[KERAS_LAYER_NAME] for node in convs}
    expected = {layer.name for layer in keras_models["mobilenet"].layers
                if type(layer).__name__ in ("Conv2D", "DepthwiseConv2D")}  # fmt: skip
    assert conv_layers == expected  # no BatchNorm folded into a convolution
    assert all("/stem_conv" in node.name for node in convs[:1])
    assert {node_metadata(node)[KERAS_LAYER_CLASS] for node in convs} == {"Conv2D", "DepthwiseConv2D"}
    bn_nodes = {node_metadata(node).get(KERAS_LAYER_NAME) for node in model.graph.node if node.op_type == "Mul"}
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


def test_from_keras_makes_captured_constants_initializers(keras, ort_session):
    # Normalization (the stem of every keras.applications EfficientNet) holds its
    # mean and variance as constants the trace captures; they are weights, not inputs.
    from tensorstate_onnx.converters import from_keras

    keras.utils.set_random_seed(3)
    image = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Normalization(mean=[0.1, 0.2, 0.3], variance=[1.0, 2.0, 3.0], name="norm")(image)
    x = keras.layers.Rescaling(1 / 255.0, offset=-0.5, name="rescale")(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu", name="conv")(x))
    model = keras.Model(image, keras.layers.Dense(2, name="head")(x))
    proto = from_keras(model)
    assert [i.name for i in proto.graph.input] == ["image"]
    used = {name for node in proto.graph.node for name in node.input}
    assert all(init.name in used for init in proto.graph.initializer), "no unused initializer is left"
    x = np.random.default_rng(0).normal(size=(3, 8, 8, 3)).astype(np.float32)
    (got,) = ort_session(proto).run(None, {"image": x})
    np.testing.assert_allclose(got, model.predict(x, verbose=0), atol=1e-5)


def test_from_keras_of_an_efficiency_model_exports_identities(keras, keras_models, ort_session):
    from tensorstate_onnx.converters import from_keras
    from tensorstate_onnx.keras_capture import build_keras_efficiency_model

    probed = build_keras_efficiency_model(keras_models["lenet5"], ["Conv2D"])
    proto = from_keras(probed)
    assert [c.state_count for c in probed.efficiency_layers] == [0, 0, 0]
    x = np.random.default_rng(1).normal(size=(4, 28, 28, 1)).astype(np.float32)
    (got,) = ort_session(proto).run(None, {"input": x})
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
