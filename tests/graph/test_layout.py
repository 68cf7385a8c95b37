"""Tests of tensorstate_onnx.graph.layout: the neuron (channel) axis of every probed tensor."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from tensorstate_onnx.errors import ChannelAxisError, GuessedAxisWarning, OptionTypeError, ProbeDtypeError
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


def test_a_reduction_over_the_channels_is_a_warned_guess_as_natively(initializer):
    """x.mean(1) of a conv output: no rule gives its neurons; the PyTorch hooks warn, so does this path."""
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("ReduceMean", ["c"], ["m"], name="channel_mean", axes=[1], keepdims=0),
    ]
    g = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 4, 5])],
        [helper.make_tensor_value_info("m", TensorProto.FLOAT, ["N", 4, 5])], [initializer("W", 3, 2, 1, 1)],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.warns(GuessedAxisWarning, match="channel_mean:after"):
        _, probes = add_probes(model, ["channel_mean"])
    assert (probes[0].channel_axis, probes[0].axis_guessed) == (2, True)


@pytest.mark.parametrize("producer", ["tf2onnx", "pytorch"], ids=["tf2onnx", "other"])
def test_channels_last_producers(producer, make_cnn, tf2onnx_style):
    """Inputs of tf2onnx models are Keras tensors, channels-last whatever reads them;
    elsewhere an input read by a MatMul has its features last, and one read by a
    Reshape only has no rule (the last axis, a guess). A Reshape read only by a Conv
    has its neurons on axis 1 in any model."""
    model = tf2onnx_style(producer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, probes = add_probes(model, ["to_nchw", "dense", "conv"], method="both")
    guessed = [str(w.message) for w in caught if issubclass(w.category, GuessedAxisWarning)]
    assert len(guessed) == (producer != "tf2onnx")
    assert all("channel_axes={'to_nchw:before': <axis>}" in text for text in guessed)
    axes = {p.name: (p.tensor_name, p.channel_axis, p.n_neurons) for p in probes}
    assert axes["to_nchw:before"] == ("img", 3, 1)
    assert axes["dense:before"] == ("seq", 2, 8)
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
    by ONNX op, the Reshape tf2onnx puts in front of the Conv (axis 1), a tensor inside the
    layer, as its name says (``conv1/Conv``; conv2's Conv reads the layer's input). Both give the native states: 784
    one-neuron states per image."""
    from tensorstate_onnx import build_efficiency_model
    from tensorstate_onnx.runtime import OnnxEfficiencyModel

    model, exported, x = keras_lenet
    native = build_efficiency_model(model, ["Conv2D"], method="before")
    native.predict(x, batch_size=32, verbose=0)
    onnx_model = OnnxEfficiencyModel(exported, attach_to, method="before", providers="cpu")
    onnx_model.predict(x, batch_size=32)
    first_name = "conv1/Conv:before" if attach_to == ["Conv"] else "conv1:before"
    assert [(p.name, p.n_neurons) for p in onnx_model.probes] == [
        (first_name, 1), ("conv2:before", 20), ("conv3:before", 50),
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


def test_keras_layer_normalization_of_a_sequence_input_is_channels_last(assert_same_states):
    """tf2onnx computes a LayerNormalization's moments over the last axis of a (7, 32)
    input with GlobalAveragePool, which reads axis 1 as channels: the input is still
    channels-last, 32 neurons at 7 positions, as natively."""
    keras = pytest.importorskip("keras")
    pytest.importorskip("tf2onnx")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("from_keras converts through TensorFlow")
    from tensorstate_onnx import build_efficiency_model

    inputs = keras.Input((7, 32), name="seq")
    model = keras.Model(inputs, keras.layers.LayerNormalization(name="ln")(inputs))
    x = np.random.default_rng(5).normal(size=(6, 7, 32)).astype(np.float32)
    native = build_efficiency_model(model, ["ln"], method="before")
    native.predict(x, verbose=0)
    onnx_model = build_efficiency_model(model, ["ln"], method="before", runtime="onnxruntime", providers="cpu")
    onnx_model.predict(x)
    assert [(p.name, p.channel_axis, p.n_neurons) for p in onnx_model.probes] == [("ln:before", 2, 32)]
    assert onnx_model.efficiency_layers[0].state_count == 6 * 7
    assert_same_states(native.efficiency_layers[0], onnx_model.efficiency_layers[0], exact=True)


# ---------------------------------------------------------------- shape ops, readers, rank 1


def _model(nodes, inputs, outputs, inits, opset=20):
    g = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _ints(name, values):
    return numpy_helper.from_array(np.array(values, np.int64), name)


def _vi(name, dims):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _strict_probes(model, attach_to, **kwargs):
    """add_probes with every GuessedAxisWarning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuessedAxisWarning)
        return add_probes(model, attach_to, **kwargs)


def _conv1d_as_conv2d(initializer):
    """A Conv1D exported as Unsqueeze -> Conv (2-D) -> Squeeze, then Gelu."""
    nodes = [
        helper.make_node("Unsqueeze", ["x", "ax2"], ["u"], name="unsqueeze"),
        helper.make_node("Conv", ["u", "W", "B"], ["c"], name="conv"),
        helper.make_node("Squeeze", ["c", "ax2"], ["s"], name="squeeze"),
        helper.make_node("Gelu", ["s"], ["g"], name="gelu"),
    ]
    return _model(nodes, [_vi("x", ["N", 4, 9])], [_vi("g", ["N", 6, 7])],
                  [_ints("ax2", [2]), initializer("W", 6, 4, 1, 3), initializer("B", 6)])  # fmt: skip


def test_squeeze_after_a_conv_keeps_the_channels(initializer, torch, assert_same_states, numpy_counts):
    """The Gelu after Conv2D + Squeeze has the Conv's 6 channels as neurons (it was
    measured on the 7 positions), and counts what torch's Conv1d + GELU count."""
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import attach_hooks

    model = _conv1d_as_conv2d(initializer)
    _, probes = _strict_probes(model, ["unsqueeze", "squeeze", "gelu"], method="both")
    assert [(p.name, p.channel_axis, p.n_neurons) for p in probes] == [
        ("unsqueeze:before", 1, 4), ("unsqueeze:after", 1, 4),
        ("squeeze:before", 1, 6), ("squeeze:after", 1, 6), ("gelu:before", 1, 6), ("gelu:after", 1, 6),
    ]  # fmt: skip
    x = np.random.default_rng(0).normal(size=(40, 4, 9)).astype(np.float32)
    onnx_model = OnnxEfficiencyModel(model, ["gelu"], providers="cpu", keep_states=True)
    onnx_model.predict(x, batch_size=16)
    (probe,) = onnx_model.efficiency_layers
    weights = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    native = torch.nn.Sequential(torch.nn.Conv1d(4, 6, 3), torch.nn.GELU())
    with torch.no_grad():
        native[0].weight.copy_(torch.from_numpy(weights["W"][:, :, 0, :].copy()))
        native[0].bias.copy_(torch.from_numpy(weights["B"].copy()))
        attach_hooks(native, ["1"])
        y = native(torch.from_numpy(x))
    assert (probe.state_count, probe.n_neurons) == (40 * 7, 6)
    assert_same_states(native.efficiency_layers[0], probe)
    assert numpy_counts(y.numpy(), 1) == dict(zip(native.efficiency_layers[0].state_ids(),
                                                  native.efficiency_layers[0].counts().tolist()))


def test_a_conv_reading_a_transposed_input_decides_its_axis(initializer, run, numpy_counts):
    """[N, L, C] -> Transpose -> Unsqueeze -> Conv: the Conv reads C as channels; so
    do the probes before it (no longer axis 3 with 1 neuron), back to the input."""
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], name="tr", perm=[0, 2, 1]),
        helper.make_node("Unsqueeze", ["t", "ax2"], ["u"], name="unsqueeze"),
        helper.make_node("Conv", ["u", "W"], ["c"], name="conv"),
    ]
    model = _model(nodes, [_vi("x", ["N", 9, 4])], [_vi("c", ["N", 2, 1, 7])],
                   [_ints("ax2", [2]), initializer("W", 2, 4, 1, 3)])  # fmt: skip
    rewritten, probes = _strict_probes(model, ["tr", "conv"], method="before")
    assert [(p.name, p.tensor_name, p.channel_axis, p.n_neurons) for p in probes] == [
        ("tr:before", "x", 2, 4), ("conv:before", "u", 1, 4),
    ]  # fmt: skip
    x = np.random.default_rng(1).normal(size=(5, 9, 4)).astype(np.float32)
    out = run(rewritten, {"x": x})
    assert numpy_counts(out[probes[1].output_name], 1) == numpy_counts(x, 2)


def test_reshape_keeps_the_axis_only_when_untouched(initializer):
    nodes = [
        helper.make_node("Conv", ["x", "W"], ["c"], name="conv"),
        helper.make_node("Reshape", ["c", "keep"], ["kept"], name="keep"),
        helper.make_node("Relu", ["kept"], ["r"], name="relu"),
        helper.make_node("Reshape", ["c", "split"], ["split_c"], name="split"),
        helper.make_node("Flatten", ["c"], ["flat"], name="flat"),
        helper.make_node("Unsqueeze", ["c", "ax0"], ["u0"], name="unsqueeze0"),
        helper.make_node("Gather", ["r", "zero"], ["first"], name="first", axis=2),
    ]
    model = _model(
        nodes, [_vi("x", ["N", 3, 4, 4])],
        [_vi("first", ["N", 6]), _vi("split_c", ["N", 3, 2, 16]), _vi("flat", ["N", 96]),
         _vi("u0", [1, "N", 6, 4, 4])],
        [initializer("W", 6, 3, 1, 1), _ints("keep", [-1, 6, 16]), _ints("split", [0, 3, 2, 16]),
         _ints("ax0", [0]), _ints("zero", 0)],
    )  # fmt: skip
    _, probes = _strict_probes(model, ["keep", "relu", "split", "flat", "unsqueeze0", "first"])
    assert [(p.name, p.channel_axis, p.n_neurons) for p in probes] == [
        ("keep:after", 1, 6), ("relu:after", 1, 6), ("split:after", 3, 16), ("flat:after", 1, 96),
        ("unsqueeze0:after", 2, 6), ("first:after", 1, 6),
    ]  # fmt: skip


def test_a_channel_shuffle_read_by_a_conv_has_the_channels_as_neurons(initializer, run, numpy_counts):
    """Conv -> Reshape [N, g, C/g, H, W] -> Transpose -> Reshape [N, C, H, W] -> Conv, as in
    ShuffleNet: the split tensor falls back on the last axis, and that fallback, carried
    through the shuffle, gave the shuffled channels' probe the width (axis 3) as neurons."""
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv1"),
        helper.make_node("Reshape", ["c1", "s5"], ["r5"], name="split"),
        helper.make_node("Transpose", ["r5"], ["t5"], perm=[0, 2, 1, 3, 4], name="swap"),
        helper.make_node("Reshape", ["t5", "s4"], ["shuffled"], name="shuffle"),
        helper.make_node("Relu", ["shuffled"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "W2"], ["y"], name="conv2"),
    ]
    model = _model(nodes, [_vi("x", ["N", 4, 5, 6])], [_vi("y", ["N", 3, 5, 6])],
                   [initializer("W1", 4, 4, 1, 1), initializer("W2", 3, 4, 1, 1),
                    _ints("s5", [0, 2, 2, 5, 6]), _ints("s4", [0, 4, 5, 6])])  # fmt: skip
    rewritten, probes = _strict_probes(model, ["split", "shuffle", "relu"])
    assert [(p.name, p.channel_axis, p.n_neurons) for p in probes] == [
        ("split:after", 4, 6), ("shuffle:after", 1, 4), ("relu:after", 1, 4),
    ]  # fmt: skip
    x = np.random.default_rng(2).normal(size=(3, 4, 5, 6)).astype(np.float32)
    out = run(rewritten, {"x": x})
    shuffled = out[probes[1].output_name]
    assert numpy_counts(shuffled, 1) == numpy_counts(out[probes[2].output_name], 1)
    assert sum(numpy_counts(shuffled, 1).values()) == 3 * 5 * 6


def test_rank_one_tensors_are_one_neuron_per_sample(initializer, numpy_counts):
    """A [N] tensor: counts independent of the batch size, an uneven last batch works."""
    from tensorstate_onnx.runtime import OnnxEfficiencyModel

    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["m"], name="dense"),
        helper.make_node("Squeeze", ["m", "ax1"], ["s"], name="squeeze"),
        helper.make_node("Tanh", ["s"], ["y"], name="tanh"),
    ]
    model = _model(nodes, [_vi("x", ["N", 4])], [_vi("y", ["N"])],
                   [initializer("W", 4, 1), _ints("ax1", [1])])  # fmt: skip
    x = np.random.default_rng(2).normal(size=(13, 4)).astype(np.float32)
    results = []
    for pack in (False, True):
        for batch in (13, 5, 4):
            onnx_model = OnnxEfficiencyModel(model, ["tanh"], providers="cpu", pack_in_graph=pack)
            y = onnx_model.predict(x, batch_size=batch)
            (capture,) = onnx_model.efficiency_layers
            assert (capture.channel_axis, capture.n_neurons, capture.state_count) == (1, 1, 13)
            results.append(dict(zip(capture.state_ids(), capture.counts().tolist())))
    assert all(r == results[0] for r in results)
    assert results[0] == numpy_counts(y, 1)


def test_a_guessed_axis_warns_and_names_the_override():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu")]
    model = _model(nodes, [_vi("x", ["N", 5, 7])], [_vi("r", ["N", 5, 7])], [])
    with pytest.warns(GuessedAxisWarning, match=r"'relu:after'.*\(2\).*channel_axes=\{'relu:after': <axis>\}"):
        _, (probe,) = add_probes(model, "relu")
    assert (probe.channel_axis, probe.n_neurons, probe.axis_guessed) == (2, 7, True)
    _, (probe,) = _strict_probes(model, "relu", channel_axes={"relu:after": 1})
    assert (probe.channel_axis, probe.n_neurons, probe.axis_guessed) == (1, 5, False)


def test_channel_axes_errors_are_typed(cnn):
    with pytest.raises(ChannelAxisError, match=r"name no probe.*tr:after"):
        add_probes(cnn, "tr", channel_axes={"nope": 1})
    with pytest.raises(ChannelAxisError, match=r"-4 to 3"):
        add_probes(cnn, "tr", channel_axes={"tr:after": 4})
    with pytest.raises(OptionTypeError):
        add_probes(cnn, "tr", channel_axes={"tr:after": 1.0})


def test_integer_and_bool_tensors_are_refused(initializer):
    """A named node's int64 or bool tensor is refused; op-type matches skip them."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"], name="embedding"),
        helper.make_node("Greater", ["e", "zero"], ["mask"], name="positive"),
        helper.make_node("Relu", ["e"], ["r"], name="relu"),
    ]
    model = _model(
        nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])],
        [helper.make_tensor_value_info("mask", TensorProto.BOOL, ["N", 5, 3]), _vi("r", ["N", 5, 3])],
        [initializer("table", 11, 3), numpy_helper.from_array(np.zeros((), np.float32), "zero")],
    )  # fmt: skip
    with pytest.raises(ProbeDtypeError, match=r"'embedding:before'.*int64.*float"):
        add_probes(model, "embedding", method="before")
    with pytest.raises(ProbeDtypeError, match=r"'positive:after'.*bool"):
        add_probes(model, "positive")
    _, probes = _strict_probes(model, ["Gather", "Greater", "Relu"], method="both")
    assert [(p.name, p.channel_axis, p.n_neurons) for p in probes] == [
        ("embedding:after", 2, 3), ("positive:before", 2, 3), ("relu:before", 2, 3), ("relu:after", 2, 3),
    ]  # fmt: skip
    with pytest.raises(ProbeDtypeError, match="float"):
        add_probes(model, ["Greater"])
