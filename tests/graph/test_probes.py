"""Tests of tensorstate_onnx.graph.probes: probe names, methods, tensors shared by several
probes, and list_nodes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tensorstate_onnx.errors import ProbeMatchError
from tensorstate_onnx.graph import add_probes, list_nodes

RNG = np.random.default_rng(1234)


# ---------------------------------------------------------------------- probes


def test_bad_method(cnn):
    with pytest.raises(ValueError, match="before, after, both"):
        add_probes(cnn, "Conv", method="around")


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


@pytest.fixture
def conv_chain(initializer) -> onnx.ModelProto:
    """x -> conv1 -> h -> conv2 -> y: conv1's output is conv2's input, nothing between."""
    nodes = [
        helper.make_node("Conv", ["x", "W1"], ["h"], name="conv1"),
        helper.make_node("Conv", ["h", "W2"], ["y"], name="conv2"),
    ]
    g = helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 2, 2])],
        [initializer("W1", 4, 3, 3, 3), initializer("W2", 5, 4, 3, 3)],
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_both_probes_a_tensor_shared_by_two_layers(conv_chain):
    """conv1:after and conv2:before are one tensor: two probes (as the native front
    ends record) on one graph output; naming conv1 twice still gives one probe each."""
    model = conv_chain
    rewritten, probes = add_probes(model, ["Conv", "conv1"], method="both")
    assert [(p.name, p.tensor_name, p.output_name) for p in probes] == [
        ("conv1:before", "x", "x_fired"), ("conv1:after", "h", "h_fired"),
        ("conv2:before", "h", "h_fired"), ("conv2:after", "y", "y"),
    ]  # fmt: skip
    assert [o.name for o in rewritten.graph.output] == ["y", "x_fired", "h_fired"]
    _, packed = add_probes(model, ["Conv", "conv1"], method="both", pack_in_graph=True)
    assert len({p.output_name for p in packed}) == 3
    assert packed[1].output_name == packed[2].output_name != "h"


def test_runtime_feeds_a_shared_output_to_each_of_its_probes(run, packbits, state_counts, conv_chain):
    from tensorstate_onnx.runtime import OnnxEfficiencyModel

    class Requests:
        """Wraps a session and records the output names each run asks for."""

        def __init__(self, session):
            self.session, self.names = session, []

        def run(self, names, feed):
            self.names.append(list(names))
            return self.session.run(names, feed)

    model = conv_chain
    x = RNG.standard_normal((8, 3, 6, 6)).astype(np.float32)
    efficiency = OnnxEfficiencyModel(model, ["Conv", "conv1"], method="both", providers="cpu")
    efficiency.session = Requests(efficiency.session)
    efficiency.predict(x, batch_size=4)
    assert efficiency.session.names == [["y", "x_fired", "h_fired"]] * 2
    captures = {c.name: c for c in efficiency.efficiency_layers}
    assert list(captures) == ["conv1:before", "conv1:after", "conv2:before", "conv2:after"]
    h = run(add_probes(model, "conv1")[0], {"x": x})["h_fired"]
    ids, counts = np.unique(packbits(h, 1), axis=0, return_counts=True)
    expected = dict(zip((row.tobytes() for row in ids), counts.tolist()))
    assert state_counts(captures["conv1:after"]) == expected
    assert state_counts(captures["conv2:before"]) == expected
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


def test_torch_adjacent_convs_both_match_hooks(assert_same_states):
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
        assert_same_states(hook, probes[name], exact=name == "conv1:before")
    remove_state_layers(net)


# ------------------------------------------------------------------ list_nodes


def test_list_nodes(cnn):
    nodes = list_nodes(cnn)
    assert len(nodes) == 11
    relu = nodes[2]
    assert relu == {
        "name": "Relu_2", "op_type": "Relu", "labels": [], "inputs": ["n"], "outputs": ["r"],
        "output_shapes": [(None, 6, 6, 6)], "channel_axes": [1], "axes_guessed": [False], "probeable": [True],
    }  # fmt: skip
    assert nodes[6]["output_shapes"] == [(None, 54)]


def test_list_nodes_marks_shape_arithmetic_and_integers_not_probeable(shape_math_model):
    model = shape_math_model
    probeable = {node["name"]: node["probeable"] for node in list_nodes(model)}
    assert probeable == {
        "relu": [True], "shape": [False], "to_float": [False], "scale": [False], "zeros": [False],
        "add": [True], "to_int": [False],
    }  # fmt: skip
