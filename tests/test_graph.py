"""Tests of the ONNX rewriter: matching, channel axes, outputs, packing, files."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tensorstate_onnx import graph
from tensorstate_onnx.errors import ModelFileError, ProbeMatchError
from tensorstate_onnx.graph import Probe, add_probes, list_nodes, load_model, save_model

RNG = np.random.default_rng(1234)
LEVELS = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
ALL_LEVELS = tuple(ort.GraphOptimizationLevel.__members__.values())


# ---------------------------------------------------------------- helpers


def _init(name: str, *shape: int) -> onnx.TensorProto:
    return numpy_helper.from_array(RNG.standard_normal(shape).astype(np.float32), name)


def _run(model: onnx.ModelProto | str, feeds: dict, level=LEVELS[0]) -> dict[str, np.ndarray]:
    """All outputs of ``model`` under onnxruntime CPU at optimization ``level``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [out.name for out in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


def _cut(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` from its input ``x``, as outputs."""
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    return extractor.extract_model(["x"], outputs)


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


@pytest.fixture(scope="module")
def cnn() -> onnx.ModelProto:
    return _cnn()


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return RNG.standard_normal((4, 3, 8, 8)).astype(np.float32)


def _by_tensor(probes: list[Probe]) -> dict[str, Probe]:
    return {p.tensor_name: p for p in probes}


def _identity_model(shape: list, elem=TensorProto.FLOAT, opset: int = 17) -> onnx.ModelProto:
    node = helper.make_node("Identity", ["x"], ["y"], name="id")
    g = helper.make_graph(
        [node], "id", [helper.make_tensor_value_info("x", elem, shape)],
        [helper.make_tensor_value_info("y", elem, shape)],
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _special_values(shape: tuple, dtype=np.float32) -> np.ndarray:
    """Random values with NaN, -0.0, 0.0, +inf, -inf and negatives mixed in."""
    pool = np.array([np.nan, -0.0, 0.0, np.inf, -np.inf, -1.5, 2.5, 1e-30, -1e-30], dtype=dtype)
    values = RNG.standard_normal(shape).astype(dtype)
    mask = RNG.random(shape) < 0.5
    values[mask] = RNG.choice(pool, size=int(mask.sum()))
    return values


def _packbits(x: np.ndarray, axis: int) -> np.ndarray:
    channels_last = np.moveaxis(x, axis, -1)
    return np.packbits(channels_last.reshape(-1, x.shape[axis]) > 0, axis=-1, bitorder="little")


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


def _without_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without node metadata (as a plain exporter writes it)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        del node.metadata_props[:]
    return copy


# ---------------------------------------------------------------- matching


def test_match_by_op_type(cnn):
    _, probes = add_probes(cnn, "Conv")
    assert [p.tensor_name for p in probes] == ["c", "c2"]
    assert [p.name for p in probes] == ["conv:after", "conv2:after"]
    assert all(p.op_type == "Conv" and p.method == "after" for p in probes)


def test_match_by_node_name_and_glob(cnn):
    _, probes = add_probes(cnn, "fc")
    assert [(p.name, p.tensor_name, p.node_name) for p in probes] == [("fc:after", "logits", "fc")]
    _, probes = add_probes(cnn, ["conv*", "M*Pool"])
    assert [p.tensor_name for p in probes] == ["c", "c2", "p"]


def test_matching_is_case_sensitive(cnn):
    with pytest.raises(ProbeMatchError):
        add_probes(cnn, "conV")


def test_unnamed_nodes_get_generated_names(cnn):
    names = [n["name"] for n in list_nodes(cnn)]
    assert names[2] == "Relu_2" and names[9] == "Sigmoid_9"
    rewritten, probes = add_probes(cnn, "Relu_2")
    assert [(p.name, p.tensor_name) for p in probes] == [("Relu_2:after", "r")]
    assert rewritten.graph.node[2].name == "Relu_2"
    assert cnn.graph.node[2].name == ""


def test_no_match_lists_op_types(cnn):
    with pytest.raises(ProbeMatchError) as err:
        add_probes(cnn, "nothing_like_this")
    message = str(err.value)
    for op in ("Conv", "Gemm", "MatMul", "Transpose"):
        assert op in message
    assert "nothing_like_this" in message and "conv2" in message


def test_empty_attach_to(cnn):
    with pytest.raises(ProbeMatchError):
        add_probes(cnn, [])


def test_bad_method(cnn):
    with pytest.raises(ValueError, match="before, after, both"):
        add_probes(cnn, "Conv", method="around")


def test_exclude_wins(cnn):
    _, probes = add_probes(cnn, "Conv", exclude="conv2")
    assert [p.tensor_name for p in probes] == ["c"]
    _, probes = add_probes(cnn, ["Conv", "Relu_2"], exclude="conv*")
    assert [p.tensor_name for p in probes] == ["r"]


def test_everything_excluded_raises(cnn):
    with pytest.raises(ProbeMatchError, match="exclude"):
        add_probes(cnn, "conv*", exclude="Conv")


def test_unmatched_exclude_warns(cnn):
    with pytest.warns(UserWarning, match="no_such_layer"):
        _, probes = add_probes(cnn, "Conv", exclude=["conv2", "no_such_layer"])
    assert len(probes) == 1


def test_both_gives_two_probes_and_shared_tensor_once(cnn):
    _, probes = add_probes(cnn, "bn", method="both")
    assert [(p.name, p.tensor_name, p.method) for p in probes] == [
        ("bn:before", "c", "before"), ("bn:after", "n", "after"),
    ]  # fmt: skip
    # conv:after and bn:before watch the same tensor: two probes, one new graph output;
    # "Conv" names conv again, which adds nothing.
    rewritten, probes = add_probes(cnn, ["conv", "bn", "Conv"], method="both")
    assert [(p.name, p.tensor_name) for p in probes] == [
        ("conv:before", "x"), ("conv:after", "c"), ("bn:before", "c"), ("bn:after", "n"),
        ("conv2:before", "r"), ("conv2:after", "c2"),
    ]  # fmt: skip
    shared = {p.name: p.output_name for p in probes}
    assert shared["conv:after"] == shared["bn:before"]
    added = [o.name for o in rewritten.graph.output[2:]]
    assert sorted(added) == sorted(set(shared.values())) and len(added) == 5


def _conv_chain() -> onnx.ModelProto:
    """x -> conv1 -> h -> conv2 -> y: conv1's output is conv2's input, nothing between."""
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["h"], name="conv1"),
        helper.make_node("Conv", ["h", "W2"], ["y"], name="conv2"),
    ]
    g = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 2, 2])],
        [_init("W1", 4, 3, 3, 3), _init("W2", 5, 4, 3, 3)],
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_both_probes_a_tensor_shared_by_two_layers():
    """conv1:after and conv2:before are one tensor: two probes (as the native front
    ends record) on one graph output; naming conv1 twice still gives one probe each."""
    model = _conv_chain()
    rewritten, probes = add_probes(model, ["Conv", "conv1"], method="both")
    assert [(p.name, p.tensor_name, p.output_name) for p in probes] == [
        ("conv1:before", "x", "x"), ("conv1:after", "h", "h"),
        ("conv2:before", "h", "h"), ("conv2:after", "y", "y"),
    ]  # fmt: skip
    assert [o.name for o in rewritten.graph.output] == ["y", "x", "h"]
    _, packed = add_probes(model, ["Conv", "conv1"], method="both", pack_in_graph=True)
    assert len({p.output_name for p in packed}) == 3
    assert packed[1].output_name == packed[2].output_name != "h"


def test_runtime_feeds_a_shared_output_to_each_of_its_probes():
    from tensorstate_onnx.runtime import OnnxEfficiencyModel

    class Requests:
        """Wraps a session and records the output names each run asks for."""

        def __init__(self, session):
            self.session, self.names = session, []

        def run(self, names, feed):
            self.names.append(list(names))
            return self.session.run(names, feed)

    model = _conv_chain()
    x = RNG.standard_normal((8, 3, 6, 6)).astype(np.float32)
    efficiency = OnnxEfficiencyModel(model, ["Conv", "conv1"], method="both", providers="cpu")
    efficiency.session = Requests(efficiency.session)
    efficiency.predict(x, batch_size=4)
    assert efficiency.session.names == [["y", "x", "h"]] * 2
    captures = {c.name: c for c in efficiency.efficiency_layers}
    assert list(captures) == ["conv1:before", "conv1:after", "conv2:before", "conv2:after"]
    h = _run(add_probes(model, "conv1")[0], {"x": x})["h"]
    ids, counts = np.unique(_packbits(h, 1), axis=0, return_counts=True)
    expected = dict(zip((row.tobytes() for row in ids), counts.tolist()))
    assert _state_counts(captures["conv1:after"]) == expected
    assert _state_counts(captures["conv2:before"]) == expected
    assert captures["conv1:before"].state_count == 8 * 36 and captures["conv2:after"].n_neurons == 5


def test_before_skips_initializers_and_constants():
    ones = numpy_helper.from_array(np.ones(4, np.float32))
    const = helper.make_node("Constant", [], ["k"], value=ones)
    add = helper.make_node("Add", ["k", "x"], ["y"], name="add")
    g = helper.make_graph(
        [const, add], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    _, probes = add_probes(model, "add", method="before")
    assert [(p.tensor_name, p.channel_axis) for p in probes] == [("x", 1)]
    with pytest.raises(ProbeMatchError, match="constants"):
        add_probes(model, "Constant")


# -------------------------------------------------------------- rewriting


def test_caller_model_unchanged_and_checker_passes(cnn):
    before = cnn.SerializeToString(deterministic=True)
    rewritten, _ = add_probes(cnn, "*", method="both")
    assert cnn.SerializeToString(deterministic=True) == before
    onnx.checker.check_model(rewritten, full_check=True)
    assert rewritten.opset_import == cnn.opset_import and rewritten.ir_version == cnn.ir_version
    assert [o.name for o in rewritten.graph.output[:2]] == ["logits", "branch"]
    assert rewritten.graph.output[:2] == cnn.graph.output[:2]


def test_existing_output_is_reused(cnn):
    rewritten, probes = add_probes(cnn, ["fc", "bn"])
    assert [o.name for o in rewritten.graph.output] == ["logits", "branch", "n"]
    assert {p.tensor_name: p.output_name for p in probes} == {"logits": "logits", "n": "n"}


def test_fusible_producer_is_probed_through_a_duplicate(cnn, x):
    """Exposing a Conv output read by BatchNormalization/Add would stop onnxruntime
    fusing them (and change the original outputs' rounding): a duplicate Conv with
    its own weight copy computes the probe instead."""
    rewritten, probes = add_probes(cnn, "Conv")
    assert [(p.tensor_name, p.output_name) for p in probes] == [
        ("c", "c__probe"), ("c2", "c2__probe"),
    ]  # fmt: skip
    duplicates = [n for n in rewritten.graph.node if n.name.endswith("__probe")]
    assert [(n.op_type, list(n.input)) for n in duplicates] == [
        ("Conv", ["x", "W__probe", "B__probe"]), ("Conv", ["r", "W2__probe"]),
    ]  # fmt: skip
    out = _run(rewritten, {"x": x}, LEVELS[1])
    cut = _cut(cnn, ["c", "c2"])
    reference = _run(cut, {"x": x}, LEVELS[1])
    assert np.array_equal(out["c__probe"], reference["c"])
    assert np.array_equal(out["c2__probe"], reference["c2"])


def test_probe_outputs_are_typed(cnn):
    rewritten, probes = add_probes(cnn, ["tr", "flat"])
    outputs = {o.name: o for o in rewritten.graph.output}
    for probe in probes:
        tensor_type = outputs[probe.output_name].type.tensor_type
        assert tensor_type.elem_type == TensorProto.FLOAT
        dims = tensor_type.shape.dim
        assert [d.dim_value if d.HasField("dim_value") else None for d in dims] == list(probe.shape)
        assert dims[0].dim_param == "N"
    assert _by_tensor(probes)["t"].shape == (None, 6, 6, 6)
    assert _by_tensor(probes)["f"].shape == (None, 54)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("level", ALL_LEVELS)
def test_original_outputs_bit_identical(cnn, x, level, pack):
    rewritten, probes = add_probes(cnn, "*", method="both", pack_in_graph=pack)
    assert len(probes) == 22 and len({p.tensor_name for p in probes}) == 12
    reference = _run(cnn, {"x": x}, level)
    probed = _run(rewritten, {"x": x}, level)
    for name, value in reference.items():
        assert np.array_equal(value, probed[name])


def test_probed_values_are_the_intermediates(cnn, x):
    patterns = ["conv", "bn", "Relu", "conv2", "add", "pool", "flat", "tr"]
    rewritten, probes = add_probes(cnn, patterns, method="both")
    out = _run(rewritten, {"x": x}, LEVELS[1])  # unfused, so the relations below are exact
    got = {p.tensor_name: out[p.output_name] for p in probes}
    assert np.array_equal(got["x"], x)
    assert np.array_equal(got["r"], np.maximum(got["n"], 0))
    assert np.array_equal(got["skip"], got["r"] + got["c2"])
    pooled = got["skip"].reshape(4, 6, 3, 2, 3, 2).max(axis=(3, 5))
    assert np.array_equal(got["p"], pooled)
    assert np.array_equal(got["f"], got["p"].reshape(4, -1))
    assert np.array_equal(got["t"], got["r"].transpose(0, 2, 3, 1))
    # against the graph cut right at the tensor
    cut = _cut(cnn, ["n"])
    assert np.array_equal(got["n"], _run(cut, {"x": x}, LEVELS[1])["n"])


# ----------------------------------------------------------- channel axes


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


def test_broadcast_and_reduce_axes():
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
        [_init("W", 3, 2, 1, 1), _init("scale", 1, 1, 1, 1, 1)],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    _, probes = add_probes(model, ["gap", "Mul", "squeeze"])
    assert [(p.tensor_name, p.shape, p.channel_axis, p.n_neurons) for p in probes] == [
        ("gap", (None, 3, 1, 1), 1, 3),
        ("scaled", (1, None, 3, 1, 1), 2, 3),
        ("squeezed", (1, None, 3), 2, 3),
    ]


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


@pytest.mark.parametrize(
    "producer, img_axis, seq_axis", [("tf2onnx", 3, 2), ("pytorch", 1, 1)], ids=["tf2onnx", "other"]
)
def test_channels_last_producers(producer, img_axis, seq_axis):
    """Inputs of tf2onnx models are Keras tensors, channels-last whatever reads them;
    a Reshape read only by a Conv has its neurons on axis 1 in any model."""
    model = _tf2onnx_style(producer)
    _, probes = add_probes(model, ["to_nchw", "dense", "conv"], method="both")
    axes = {p.name: (p.tensor_name, p.channel_axis, p.n_neurons) for p in probes}
    assert axes["to_nchw:before"] == ("img", img_axis, (None, 6, 6, 1)[img_axis])
    assert axes["dense:before"] == ("seq", seq_axis, (None, 4, 8)[seq_axis])
    assert axes["to_nchw:after"] == axes["conv:before"] == ("nchw", 1, 1)
    assert axes["conv:after"] == ("c", 1, 2) and axes["dense:after"] == ("d", 2, 5)
    nchw_input = _cnn()  # an input read by a Conv only (tf2onnx's inputs_as_nchw)
    nchw_input.producer_name = producer
    _, probes = add_probes(nchw_input, "conv", method="before")
    assert [(p.tensor_name, p.channel_axis) for p in probes] == [("x", 1)]


def test_old_ir_version(x):
    """IR 3 models declare every initializer as a graph input, copies included."""
    model = _cnn(opset=9)
    model.ir_version = 3
    for init in model.graph.initializer:
        declared = helper.make_tensor_value_info(init.name, init.data_type, init.dims)
        model.graph.input.append(declared)
    onnx.checker.check_model(model)
    rewritten, probes = add_probes(model, "Conv")
    assert [p.output_name for p in probes] == ["c__probe", "c2__probe"]
    assert {"W__probe", "B__probe", "W2__probe"} <= {i.name for i in rewritten.graph.input}
    reference, out = _run(model, {"x": x}), _run(rewritten, {"x": x})
    assert all(np.array_equal(reference[k], out[k]) for k in reference)


# ------------------------------------------------------------ in-graph packing


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("channels", [12, 8, 3, 17])
def test_pack_matches_numpy(channels, level):
    model = _identity_model(["N", channels, 3, 5])
    rewritten, probes = add_probes(model, "id", pack_in_graph=True)
    (probe,) = probes
    assert probe.packed_in_graph and probe.channel_axis == 1 and probe.n_neurons == channels
    assert probe.output_name != "y" and probe.tensor_name == "y"
    x = _special_values((4, channels, 3, 5))
    out = _run(rewritten, {"x": x}, level)
    packed = out[probe.output_name]
    assert packed.dtype == np.uint8 and packed.shape == (4 * 3 * 5, -(-channels // 8))
    assert np.array_equal(packed, _packbits(x, 1))
    assert np.array_equal(out["y"], x, equal_nan=True)


def test_pack_fire_rule_on_special_values():
    model = _identity_model(["N", 8])
    rewritten, probes = add_probes(model, "id", pack_in_graph=True)
    x = np.array([[np.nan, -0.0, 0.0, np.inf, -np.inf, -1.0, 1e-30, 3.0]], dtype=np.float32)
    packed = _run(rewritten, {"x": x})[probes[0].output_name]
    assert packed.tolist() == [[0b11001000]]


@settings(max_examples=25, deadline=None)
@given(
    channels=st.integers(1, 40),
    spatial=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    axis_pick=st.integers(0, 3),
    dtype=st.sampled_from([np.float32, np.float64, np.float16, np.bool_]),
)
def test_pack_property(channels, spatial, axis_pick, dtype):
    shape = [2, *spatial]
    axis = axis_pick % (len(shape) + 1)
    shape.insert(axis, channels)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = _identity_model(shape, elem)
    rewritten, probes = add_probes(model, "id", pack_in_graph=True, channel_axes={"id:after": axis})
    if dtype is np.bool_:
        x = _special_values(tuple(shape)) > 0
    else:
        x = _special_values(tuple(shape), dtype)
    packed = _run(rewritten, {"x": x})[probes[0].output_name]
    assert np.array_equal(packed, _packbits(x, axis))


def test_pack_cnn_probes_match_numpy(cnn, x):
    plain, plain_probes = add_probes(cnn, "*", method="both")
    packed, packed_probes = add_probes(cnn, "*", method="both", pack_in_graph=True)
    plain_out, packed_out = _run(plain, {"x": x}), _run(packed, {"x": x})
    for a, b in zip(plain_probes, packed_probes):
        assert (a.name, a.channel_axis) == (b.name, b.channel_axis)
        expected = _packbits(plain_out[a.output_name], a.channel_axis)
        assert np.array_equal(packed_out[b.output_name], expected), a.name


def test_pack_needs_opset_13():
    with pytest.raises(ValueError, match="opset"):
        add_probes(_identity_model(["N", 8], opset=12), "id", pack_in_graph=True)
    _, probes = add_probes(_identity_model(["N", 8], opset=12), "id")
    assert probes[0].output_name == "y"


def test_pack_needs_static_channels():
    with pytest.raises(ValueError, match="neurons"):
        add_probes(_identity_model(["N", "C"]), "id", pack_in_graph=True)


# ------------------------------------------------------------- files and size


def test_load_model_returns_proto_as_is(cnn, tmp_path):
    assert load_model(cnn) is cnn
    path = tmp_path / "cnn.onnx"
    onnx.save_model(cnn, str(path))
    assert load_model(path).SerializeToString() == cnn.SerializeToString()
    assert load_model(str(path)).graph.name == "cnn"


def test_load_model_errors(cnn, tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "missing.onnx")
    with pytest.raises(ModelFileError, match="directory"):
        load_model(tmp_path)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(RNG.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelFileError):
        load_model(garbage)
    text = tmp_path / "text.onnx"
    text.write_text("hello, I am not a model")
    with pytest.raises(ModelFileError):
        load_model(text)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(cnn.SerializeToString()[:-37])
    with pytest.raises(ModelFileError):
        load_model(truncated)
    with pytest.raises(TypeError):
        load_model(42)


def test_invalid_model_is_a_model_file_error(cnn, tmp_path):
    broken = onnx.ModelProto()
    broken.CopyFrom(cnn)
    broken.graph.node[0].input[0] = "undefined_tensor"
    path = tmp_path / "broken.onnx"
    onnx.save_model(broken, str(path))
    with pytest.raises(ModelFileError, match="not a valid ONNX model"):
        load_model(path)
    with pytest.raises(ModelFileError):
        add_probes(broken, "Conv")


def test_missing_external_data(cnn, tmp_path):
    path = save_model(cnn, tmp_path / "ext.onnx", external_data=True)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(ModelFileError):
        load_model(path)


def test_save_model_external_data_keeps_model(cnn, tmp_path):
    before = cnn.SerializeToString(deterministic=True)
    path = save_model(cnn, tmp_path / "m.onnx", external_data=True)
    assert (tmp_path / "m.onnx.data").stat().st_size > 0
    assert cnn.SerializeToString(deterministic=True) == before
    assert load_model(path).SerializeToString(deterministic=True) == before
    save_model(cnn, tmp_path / "m.onnx", external_data=True)  # overwrite, no stale bytes
    assert load_model(path).SerializeToString(deterministic=True) == before
    save_model(cnn, tmp_path / "small.onnx")
    assert not (tmp_path / "small.onnx.data").exists()


def test_large_model_goes_through_external_data(cnn, x, tmp_path, monkeypatch):
    monkeypatch.setattr(graph, "EXTERNAL_DATA_THRESHOLD", 1000)

    def no_in_memory(*args, **kwargs):
        raise AssertionError("a large model must not be shape-inferred in memory")

    checked = []
    real_check = onnx.checker.check_model

    def check_by_path(model, *args, **kwargs):
        checked.append(type(model))
        assert isinstance(model, str), "a large model must be checked through a file"
        return real_check(model, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", no_in_memory)
    monkeypatch.setattr(onnx.checker, "check_model", check_by_path)
    source = save_model(cnn, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").exists()
    rewritten, probes = add_probes(source, ["Relu", "pool"], pack_in_graph=False)
    assert checked and [p.shape for p in probes] == [(None, 6, 6, 6), (None, 6, 3, 3)]
    target = save_model(rewritten, tmp_path / "probed.onnx")
    assert (tmp_path / "probed.onnx.data").exists()
    reference, probed = _run(cnn, {"x": x}), _run(str(target), {"x": x})
    for name, value in reference.items():
        assert np.array_equal(value, probed[name])
    assert np.array_equal(probed["r"], np.maximum(probed["r"], 0))


# ------------------------------------------------------------- list_nodes


def test_list_nodes(cnn):
    nodes = list_nodes(cnn)
    assert len(nodes) == 11
    relu = nodes[2]
    assert relu == {
        "name": "Relu_2", "op_type": "Relu", "labels": [], "inputs": ["n"], "outputs": ["r"],
        "output_shapes": [(None, 6, 6, 6)],
    }  # fmt: skip
    assert nodes[6]["output_shapes"] == [(None, 54)]


# ------------------------------------------------------------ framework names


def _named_chain(names: list[tuple[str, str]], inputs, nhwc: bool = True) -> onnx.ModelProto:
    """A chain of single-input nodes (name, op) after an NHWC->NCHW Transpose."""
    nodes, current = [], "img"
    for k, (name, op) in enumerate(names):
        out = f"{name}:0"
        args = [current, f"w{k}"] if op in ("Conv", "MatMul") else [current]
        attrs = {"perm": [0, 3, 1, 2]} if op == "Transpose" else {}
        nodes.append(helper.make_node(op, args, [out], name=name, **attrs))
        current = out
    g = helper.make_graph(
        nodes, "keras", [helper.make_tensor_value_info("img", TensorProto.FLOAT, ["N", 6, 6, 3])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["N", "K"])], inputs,
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def keras_like() -> onnx.ModelProto:
    """Node names as Keras 3 ``model.export(format="onnx")`` writes them."""
    names = [
        ("sequential_1/conv1_1/convolution__6", "Transpose"),
        ("sequential_1/conv1_1/convolution", "Conv"),
        ("sequential_1/conv1_1/Relu", "Relu"),
        ("sequential_1/flatten_1/Reshape", "Flatten"),
        ("sequential_1/dense_1/MatMul", "MatMul"),
        ("sequential_1/dense_1/Relu", "Relu"),
        ("sequential_1/dense_1_1/MatMul", "MatMul"),
    ]
    inits = [_init("w1", 4, 3, 3, 3), _init("w4", 64, 5), _init("w6", 5, 2)]
    return _named_chain(names, inits)


def test_keras_layer_names(keras_like):
    _, probes = add_probes(keras_like, "conv1", method="both")
    assert [(p.name, p.tensor_name, p.channel_axis, p.op_type) for p in probes] == [
        ("conv1:before", "img", 3, "Transpose"),
        ("conv1:after", "sequential_1/conv1_1/Relu:0", 1, "Relu"),
    ]
    _, probes = add_probes(keras_like, "conv1_1")  # the exported scope name works too
    assert [p.name for p in probes] == ["conv1:after"]
    _, probes = add_probes(keras_like, "dense")
    assert [(p.name, p.tensor_name, p.channel_axis) for p in probes] == [
        ("dense:after", "sequential_1/dense_1/Relu:0", 1)
    ]
    _, probes = add_probes(keras_like, "dense_1")
    assert [p.tensor_name for p in probes] == ["sequential_1/dense_1_1/MatMul:0"]
    _, probes = add_probes(keras_like, "MatMul", exclude="dense")
    assert [p.name for p in probes] == ["dense_1:after"]
    labels = [n["labels"] for n in list_nodes(keras_like)]
    assert labels[0] == ["conv1"] and labels[6] == ["dense_1"]


def test_repeated_labels_get_distinct_probe_names(keras_like):
    _, probes = add_probes(keras_like, ["Conv", "Relu"])
    assert [(p.name, p.op_type) for p in probes] == [
        ("conv1:after", "Conv"), ("conv1:after#2", "Relu"), ("dense:after", "Relu"),
    ]  # fmt: skip


def test_tf2onnx_names_without_suffix():
    names = [
        ("model/conv1/transpose", "Transpose"), ("model/conv1/Conv2D", "Conv"),
        ("model/conv1/Relu", "Relu"), ("StatefulPartitionedCall/model/flat/Reshape", "Flatten"),
    ]  # fmt: skip
    model = _named_chain(names, [_init("w1", 4, 3, 3, 3)])
    _, probes = add_probes(model, ["conv1", "flat"])
    assert [(p.name, p.op_type) for p in probes] == [
        ("conv1:after", "Relu"), ("flat:after", "Flatten"),
    ]  # fmt: skip


def test_torch_style_metadata_and_legacy_names():
    conv = helper.make_node("Conv", ["x", "features.0.weight"], ["conv"], name="node_conv2d")
    scopes = "['', 'features', 'features.0', 'conv2d']"
    classes = str(["__main__.Net", "torch.nn.modules.container.Sequential",
                   "torch.nn.modules.conv.Conv2d", "aten.conv2d.default"])  # fmt: skip
    helper.set_metadata_props(
        conv, {"pkg.torch.onnx.name_scopes": scopes, "pkg.torch.onnx.class_hierarchy": classes}
    )
    relu = helper.make_node("Relu", ["conv"], ["relu"], name="/features/features.1/act/Relu")
    g = helper.make_graph(
        [conv, relu], "torch",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 5])],
        [helper.make_tensor_value_info("relu", TensorProto.FLOAT, ["N", 4, 5, 5])],
        [_init("features.0.weight", 4, 3, 1, 1)],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    for pattern in ("features.0", "Conv2d", "torch.nn.modules.conv.Conv2d", "features.?"):
        _, probes = add_probes(model, pattern)
        assert [p.name for p in probes][:1] == ["features.0:after"], pattern
    _, probes = add_probes(model, "features.1.act")
    assert [p.name for p in probes] == ["features.1.act:after"]
    _, probes = add_probes(model, "features", method="both")
    assert [p.tensor_name for p in probes] == ["x", "relu"]  # metadata and legacy scopes merge
    assert list_nodes(model)[1]["labels"] == ["features", "features.1", "features.1.act"]


def test_keras_layer_metadata():
    """from_keras tags each node with its Keras layer: the layer name is the label (as on
    the native path), the class name and class path select it too, the tf2onnx scope
    is an alias, and the model's inputs count as channels-last."""
    model = _tf2onnx_style("")
    conv2d = ("Conv2D", "keras.src.layers.convolutional.conv2d.Conv2D")
    layers = [
        ("m_1/conv1_1/convolution__6", "conv1", *conv2d),
        ("m_1/conv1_1/convolution", "conv1", *conv2d),
        ("m_1/dense_1_1/Tensordot/MatMul", "dense_1", "Dense", "keras.src.layers.core.dense.Dense"),
    ]
    for node, (name, layer, cls, path) in zip(model.graph.node, layers):
        node.name = name
        helper.set_metadata_props(node, {
            "pkg.keras.layer_name": layer, "pkg.keras.layer_class": cls,
            "pkg.keras.layer_class_path": path,
        })  # fmt: skip
    for pattern in ("Conv2D", "*.Conv2D", "conv1", "conv1_1"):
        _, probes = add_probes(model, pattern, method="both")
        assert [(p.name, p.tensor_name, p.channel_axis) for p in probes] == [
            ("conv1:before", "img", 3), ("conv1:after", "c", 1),
        ], pattern  # fmt: skip
    _, probes = add_probes(model, "Dense", method="before")
    assert [(p.name, p.channel_axis) for p in probes] == [("dense_1:before", 2)]
    assert [n["labels"] for n in list_nodes(model)] == [["conv1"], ["conv1"], ["dense_1"]]
    with pytest.raises(ProbeMatchError):  # node names alone carry no classes
        add_probes(_without_metadata(model), "Conv2D")


def test_torch_legacy_names_of_nested_containers():
    """A legacy component that extends the one before it is a container's child
    (``conv.0`` -> ``conv.0.0``); any other is an attribute of its parent."""
    paths = {
        "/features/features.1/conv/conv.0/conv.0.0/Conv": ["features", "features.1",
            "features.1.conv", "features.1.conv.0", "features.1.conv.0.0"],
        "/features/features.1/conv/conv.1/Relu": ["features", "features.1", "features.1.conv",
            "features.1.conv.1"],
        "/blocks/blocks.0/ml.0/Relu": ["blocks", "blocks.0", "blocks.0.ml.0"],
        "/0/Relu": ["0"],
    }  # fmt: skip
    nodes = [helper.make_node("Relu", [f"t{k}"], [f"t{k + 1}"], name=name)
             for k, name in enumerate(paths)]  # fmt: skip
    g = helper.make_graph(
        nodes, "legacy", [helper.make_tensor_value_info("t0", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info(f"t{len(paths)}", TensorProto.FLOAT, ["N", 3])],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    assert [n["labels"] for n in list_nodes(model)] == list(paths.values())
    _, probes = add_probes(model, "features.1.conv.0", method="both")
    assert [(p.name, p.tensor_name) for p in probes] == [
        ("features.1.conv.0:before", "t0"), ("features.1.conv.0:after", "t1"),
    ]  # fmt: skip


# --------------------------------------------------------------- real exports


@pytest.fixture(scope="module")
def torch_exports(tmp_path_factory):
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.conv1 = nn.Conv2d(4, 5, 3)
            self.fc = nn.Linear(5 * 4 * 4, 7)

        def forward(self, x):
            x = torch.relu(self.conv1(self.features(x)))
            return self.fc(x.flatten(1))

    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.features[1].running_mean.uniform_(-1, 1)
        net.features[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 8, 8)
    folder = tmp_path_factory.mktemp("torch")
    paths = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind, kwargs in [
            ("dynamo", {"dynamo": True, "optimize": False}),
            ("dynamo_opt", {"dynamo": True}),
            ("legacy", {"dynamo": False}),
        ]:
            paths[kind] = str(folder / f"{kind}.onnx")
            torch.onnx.export(net, (x,), paths[kind], input_names=["x"], verbose=False, **kwargs)
    with torch.no_grad():
        hidden = {"features.0": net.features[0](x), "conv1": net.conv1(net.features(x))}
    return paths, x.numpy(), {k: v.numpy() for k, v in hidden.items()}


@pytest.mark.parametrize("kind", ["dynamo", "dynamo_opt", "legacy"])
def test_torch_export_module_and_class_names(torch_exports, kind):
    paths, x, hidden = torch_exports
    model = load_model(paths[kind])
    _, probes = add_probes(model, "conv1", method="both")
    assert [(p.name, p.op_type, p.channel_axis, p.shape) for p in probes] == [
        ("conv1:before", "Conv", 1, (2, 4, 6, 6)), ("conv1:after", "Conv", 1, (2, 5, 4, 4)),
    ]  # fmt: skip
    _, probes = add_probes(model, "fc")
    assert [(p.name, p.op_type, p.channel_axis, p.n_neurons) for p in probes] == [
        ("fc:after", "Gemm", 1, 7),
    ]
    _, probes = add_probes(model, "features", method="both")
    assert [p.shape for p in probes] == [(2, 3, 8, 8), (2, 4, 6, 6)]
    if kind != "legacy":  # the legacy exporter keeps no class names
        _, by_class = add_probes(model, "Conv2d")
        _, by_full_class = add_probes(model, "torch.nn.modules.conv.Conv2d")
        assert [p.tensor_name for p in by_class] == [p.tensor_name for p in by_full_class]
        assert {p.label for p in by_class} >= {"conv1"}


@pytest.mark.parametrize("kind", ["dynamo", "dynamo_opt", "legacy"])
def test_torch_export_values(torch_exports, kind):
    paths, x, hidden = torch_exports
    rewritten, probes = add_probes(paths[kind], ["features.0", "conv1"])
    names = {p.label: p.output_name for p in probes}
    for level in ALL_LEVELS:
        out = _run(rewritten, {"x": x}, level)
        reference = _run(paths[kind], {"x": x}, level)
        assert all(np.array_equal(reference[k], out[k]) for k in reference)
        assert np.allclose(out[names["conv1"]], hidden["conv1"], atol=1e-5)
    if kind == "dynamo":  # unfused: features.0 is the Conv before BatchNorm
        assert np.allclose(out[names["features.0"]], hidden["features.0"], atol=1e-5)


def test_keras_export(tmp_path):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf2onnx")
    keras = pytest.importorskip("keras")
    layers = keras.layers
    inp = keras.Input((8, 8, 3), name="img")
    h = layers.Conv2D(4, 3, activation="relu", name="conv1")(inp)
    h = layers.Add(name="add")([h, layers.Conv2D(4, 1, name="conv2")(h)])
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    out = layers.Dense(3, name="dense")(h)
    model = keras.Model(inp, out)
    x = RNG.standard_normal((2, 8, 8, 3)).astype(np.float32)
    model(x)
    path = tmp_path / "keras.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.export(str(path), format="onnx", verbose=False)
    rewritten, probes = add_probes(path, ["conv1", "add", "gap", "dense"], method="both")
    assert [(p.name, p.channel_axis, p.n_neurons) for p in probes] == [
        ("conv1:before", 3, 3), ("conv1:after", 1, 4), ("add:before", 1, 4), ("add:after", 1, 4),
        ("gap:before", 1, 4), ("gap:after", 1, 4), ("dense:before", 1, 4), ("dense:after", 1, 3),
    ]  # fmt: skip
    outputs = {p.name: p.output_name for p in probes}
    assert outputs["conv1:after"] == outputs["add:before"]
    assert outputs["gap:after"] == outputs["dense:before"]
    input_name = rewritten.graph.input[0].name
    reference, out = _run(str(path), {input_name: x}), _run(rewritten, {input_name: x})
    assert all(np.array_equal(reference[k], out[k]) for k in reference)
    conv1 = keras.Model(inp, model.get_layer("conv1").output)(x).numpy()
    assert np.allclose(np.moveaxis(out[probes[1].output_name], 1, -1), conv1, atol=1e-5)


@pytest.fixture(scope="module")
def keras_lenet(keras):
    """The Keras LeNet-5, its from_keras export and a batch of (28, 28, 1) images."""
    from tensorstate_onnx.converters import from_keras
    from tensorstate_onnx.models.keras_models import lenet5

    keras.utils.set_random_seed(0)
    model = lenet5()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = from_keras(model)
    x = np.random.default_rng(3).normal(size=(64, 28, 28, 1)).astype(np.float32)
    return model, exported, x


def test_keras_classes_select_the_native_layers(keras_lenet):
    """attach_to=["Conv2D"] on the ONNX path probes the layers the native Keras path
    probes, under the same labels, and records the same states."""
    from tensorstate_onnx import build_efficiency_model

    model, _, x = keras_lenet
    native = build_efficiency_model(model, ["Conv2D"])
    native.predict(x, batch_size=32, verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        onnx_model = build_efficiency_model(
            model, ["Conv2D"], runtime="onnxruntime", providers="cpu"
        )
    onnx_model.predict(x, batch_size=32)
    layers = [("conv1", "after"), ("conv2", "after"), ("conv3", "after")]
    assert [(c.label, c.method) for c in native.efficiency_layers] == layers
    assert [(p.label, p.method) for p in onnx_model.probes] == layers
    for native_capture, probe in zip(native.efficiency_layers, onnx_model.efficiency_layers):
        _assert_same_states(native_capture, probe)


@pytest.mark.parametrize("attach_to", [["Conv2D"], ["Conv"]], ids=["layer", "op"])
def test_keras_before_the_first_conv_is_channels_last(keras_lenet, attach_to):
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
    _assert_same_states(*first, exact=True)
    for native_capture, probe in rest:
        _assert_same_states(native_capture, probe)


def test_keras_dense_on_a_sequence_is_channels_last():
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
    _assert_same_states(*before, exact=True)
    _assert_same_states(*after)


def test_torch_adjacent_convs_both_match_hooks():
    """conv1 -> conv2 with method="both": the ONNX path records conv1:after and
    conv2:before (one tensor) as the torch hooks do."""
    torch = pytest.importorskip("torch")
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import attach_hooks, remove_state_layers

    class Chain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 4, 3)
            self.conv2 = torch.nn.Conv2d(4, 5, 3)

        def forward(self, x):
            return self.conv2(self.conv1(x))

    torch.manual_seed(0)
    net = Chain().eval()
    x = torch.randn(16, 3, 10, 10)
    onnx_model = OnnxEfficiencyModel(
        from_torch(net, x[:1], dynamo=False), ["Conv2d"], method="both", providers="cpu"
    )
    onnx_model.predict(x.numpy(), batch_size=8)
    attach_hooks(net, ["Conv2d"], method="both")
    with torch.no_grad():
        net(x)
    hooks = {hook.name: hook for hook in net.efficiency_layers}
    probes = {capture.name: capture for capture in onnx_model.efficiency_layers}
    assert list(probes) == ["conv1:before", "conv1:after", "conv2:before", "conv2:after"]
    assert set(hooks) == set(probes)
    assert probes["conv1:after"].probe.output_name == probes["conv2:before"].probe.output_name
    for name, hook in hooks.items():
        _assert_same_states(hook, probes[name], exact=name == "conv1:before")
    remove_state_layers(net)


@pytest.fixture(scope="module")
def legacy_mobilenet():
    """The MobileNetV2-style torch model and its legacy (TorchScript) export."""
    torch = pytest.importorskip("torch")
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.models.torch_models import MobileNetV2Small

    torch.manual_seed(0)
    net = MobileNetV2Small().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = from_torch(net, torch.zeros(1, 3, 32, 32), dynamo=False)
    return net, exported


def test_torch_legacy_names_are_real_modules(legacy_mobilenet):
    """Module names read from legacy node names alone are real modules: the ones
    from_torch resolved by walking the module tree."""
    net, exported = legacy_mobilenet
    derived = [n["labels"] for n in list_nodes(_without_metadata(exported))]
    compared = 0
    for node, labels in zip(exported.graph.node, derived):
        meta = {prop.key: prop.value for prop in node.metadata_props}
        if "pkg.torch.onnx.name_scopes" in meta:
            resolved = graph._literal_list(meta["pkg.torch.onnx.name_scopes"])[1:-1]
            assert labels == resolved, node.name
            compared += 1
    assert compared > 80
    labels = {label for node_labels in derived for label in node_labels}
    assert labels <= set(dict(net.named_modules()))
    assert {"features.1.conv.0", "features.1.conv.0.0", "features.2.conv.1.0"} <= labels


def test_torch_legacy_nested_modules_match_hooks(legacy_mobilenet):
    """attach_to nested module names on a plain legacy export (no metadata) probes the
    modules torch hooks probe, with the same states."""
    torch = pytest.importorskip("torch")
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import attach_hooks, remove_state_layers

    net, exported = legacy_mobilenet
    attach_to = ["features.1.conv.0", "features.2.conv.1.0"]
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    onnx_model = OnnxEfficiencyModel(_without_metadata(exported), attach_to, method="both",
                                     providers="cpu")  # fmt: skip
    onnx_model.predict(x.numpy(), batch_size=4)
    attach_hooks(net, attach_to, method="both")
    with torch.no_grad():
        net(x)
    hooks = {hook.name: hook for hook in net.efficiency_layers}
    probes = {capture.name: capture for capture in onnx_model.efficiency_layers}
    assert sorted(probes) == sorted(hooks) == sorted(
        f"{name}:{method}" for name in attach_to for method in ("before", "after")
    )
    for name, hook in hooks.items():
        _assert_same_states(hook, probes[name])
    remove_state_layers(net)
