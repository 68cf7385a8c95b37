"""Tests of tensorstate_onnx.graph.layout: the neuron (channel) axis of every probed tensor."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper

from tensorstate_onnx.graph import add_probes

# ---------------------------------------------------------------- channel axes


def test_channel_axes_propagate(cnn):
    _, probes = add_probes(cnn, "*", method="both")
    axes = {p.tensor_name: p.channel_axis for p in probes}
    assert axes == {
        "x": 1, "c": 1, "n": 1, "r": 1, "c2": 1, "skip": 1, "p": 1,
        "f": 1, "logits": 1, "t": 3, "sg": 3, "branch": 3,
    }  # fmt: skip
    neurons = {p.tensor_name: p.n_neurons for p in probes}
    assert neurons["c"] == 6 and neurons["f"] == 54 and neurons["logits"] == 10
    assert neurons["branch"] == 5


def test_channel_axes_override(cnn):
    _, probes = add_probes(cnn, "tr", channel_axes={"tr:after": -1})
    assert probes[0].channel_axis == 3
    _, probes = add_probes(cnn, "tr", channel_axes={"t": 2})
    assert (probes[0].channel_axis, probes[0].n_neurons) == (2, 6)
    _, probes = add_probes(cnn, "fc", method="both", channel_axes={"fc": 0})
    assert [p.channel_axis for p in probes] == [0, 0]


@pytest.mark.parametrize("axes", [{"tr:after": 4}, {"tr:after": -5}, {"nope": 1}])
def test_channel_axes_invalid(cnn, axes):
    with pytest.raises(ValueError):
        add_probes(cnn, "tr", channel_axes=axes)


def test_broadcast_and_reduce_axes(initializer):
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("ReduceMean", ["c"], ["gap"], name="gap", axes=[2, 3], keepdims=1),
        helper.make_node("Mul", ["gap", "scale"], ["scaled"], name="scale"),
        helper.make_node("ReduceMean", ["scaled"], ["squeezed"], name="squeeze", axes=[3, 4],
                         keepdims=0),
    ]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 4])],
        [helper.make_tensor_value_info("squeezed", TensorProto.FLOAT, [1, "N", 3])],
        [initializer("W", 3, 2, 1, 1), initializer("scale", 1, 1, 1, 1, 1)],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    _, probes = add_probes(model, ["gap", "Mul", "squeeze"])
    assert [(p.tensor_name, p.shape, p.channel_axis, p.n_neurons) for p in probes] == [
        ("gap", (None, 3, 1, 1), 1, 3),
        ("scaled", (1, None, 3, 1, 1), 2, 3),
        ("squeezed", (1, None, 3), 2, 3),
    ]


@pytest.mark.parametrize(
    "producer, img_axis, seq_axis", [("tf2onnx", 3, 2), ("pytorch", 1, 1)], ids=["tf2onnx", "other"]
)
def test_channels_last_producers(producer, img_axis, seq_axis, make_cnn, tf2onnx_style):
    """Inputs of tf2onnx models are Keras tensors, channels-last whatever reads them;
    a Reshape read only by a Conv has its neurons on axis 1 in any model."""
    model = tf2onnx_style(producer)
    _, probes = add_probes(model, ["to_nchw", "dense", "conv"], method="both")
    axes = {p.name: (p.tensor_name, p.channel_axis, p.n_neurons) for p in probes}
    assert axes["to_nchw:before"] == ("img", img_axis, (None, 6, 6, 1)[img_axis])
    assert axes["dense:before"] == ("seq", seq_axis, (None, 4, 8)[seq_axis])
    assert axes["to_nchw:after"] == axes["conv:before"] == ("nchw", 1, 1)
    assert axes["conv:after"] == ("c", 1, 2) and axes["dense:after"] == ("d", 2, 5)
    nchw_input = make_cnn()  # an input read by a Conv only (tf2onnx's inputs_as_nchw)
    nchw_input.producer_name = producer
    _, probes = add_probes(nchw_input, "conv", method="before")
    assert [(p.tensor_name, p.channel_axis) for p in probes] == [("x", 1)]


# ---------------------------------------------------------------- Keras models


@pytest.mark.parametrize("attach_to", [["Conv2D"], ["Conv"]], ids=["layer", "op"])
def test_keras_before_the_first_conv_is_channels_last(keras_lenet, attach_to, assert_same_states):
    """Before conv1 is the (28, 28, 1) image: by layer, the NHWC model input (last axis);
    by ONNX op, the Reshape tf2onnx puts in front of the Conv (axis 1). Both give the
    native states: 784 one-neuron states per image."""
    from tensorstate_onnx import build_efficiency_model
    from tensorstate_onnx.runtime import OnnxEfficiencyModel

    model, exported, x = keras_lenet
    native = build_efficiency_model(model, ["Conv2D"], method="before")
    native.predict(x, batch_size=32, verbose=0)
    onnx_model = OnnxEfficiencyModel(exported, attach_to, method="before", providers="cpu")
    onnx_model.predict(x, batch_size=32)
    assert [(p.name, p.n_neurons) for p in onnx_model.probes] == [
        ("conv1:before", 1), ("conv2:before", 20), ("conv3:before", 50),
    ]  # fmt: skip
    first, *rest = zip(native.efficiency_layers, onnx_model.efficiency_layers)
    assert first[1].state_count == len(x) * 28 * 28
    assert_same_states(*first, exact=True)
    for native_capture, probe in rest:
        assert_same_states(native_capture, probe)


def test_keras_dense_on_a_sequence_is_channels_last(assert_same_states):
    """A Dense layer on (4, 8) inputs: the neurons of its input are the last axis."""
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("from_keras converts through TensorFlow")
    from tensorstate_onnx import build_efficiency_model

    inputs = keras.Input((4, 8), name="seq")
    hidden = keras.layers.Dense(5, activation="relu", name="dense1")(inputs)
    flat = keras.layers.Flatten(name="flatten")(hidden)
    model = keras.Model(inputs, keras.layers.Dense(3, name="dense2")(flat))
    x = np.random.default_rng(4).normal(size=(32, 4, 8)).astype(np.float32)
    native = build_efficiency_model(model, ["dense1"], method="both")
    native.predict(x, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_model = build_efficiency_model(model, ["dense1"], method="both", runtime="onnxruntime",
                                            providers="cpu")  # fmt: skip
    onnx_model.predict(x)
    assert [(p.name, p.n_neurons) for p in onnx_model.probes] == [
        ("dense1:before", 8), ("dense1:after", 5),
    ]  # fmt: skip
    before, after = zip(native.efficiency_layers, onnx_model.efficiency_layers)
    assert before[1].state_count == 32 * 4
    assert_same_states(*before, exact=True)
    assert_same_states(*after)
