"""Tests of tensorstate_onnx.graph.scopes: what attach_to and exclude match, from op types
and node names to the framework names (PyTorch modules and classes, Keras layers) that
survive export."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tensorstate_onnx.errors import ProbeMatchError
from tensorstate_onnx.graph import add_probes, list_nodes, load_model
from tensorstate_onnx.graph.metadata import parse_list

RNG = np.random.default_rng(1234)
ALL_LEVELS = tuple(ort.GraphOptimizationLevel.__members__.values())


# -------------------------------------------------------------------- matching


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


def test_no_match_names_matches_inside_control_flow_bodies():
    def branch(name, op):
        inner = helper.make_node(op, ["x"], [f"{name}_out"], name=f"{name}_{op.lower()}")
        return helper.make_graph([inner], name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, [2])])

    nested = helper.make_node("If", ["flag"], ["deep"], name="inner_if",
                              then_branch=branch("deep_then", "Relu"), else_branch=branch("deep_else", "Neg"))  # fmt: skip
    outer_then = helper.make_graph([nested], "outer_then", [], [helper.make_tensor_value_info("deep", TensorProto.FLOAT, [2])])
    graph = helper.make_graph(
        [helper.make_node("If", ["flag"], ["y"], name="outer_if", then_branch=outer_then, else_branch=branch("else", "Relu"))],
        "control_flow",
        [helper.make_tensor_value_info("flag", TensorProto.BOOL, []), helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ProbeMatchError) as err:
        add_probes(model, "Relu")
    message = str(err.value)
    assert "cannot be probed" in message and "Op types present: If." in message
    assert "Relu deep_then_relu in the body of If outer_if" in message
    assert "Relu else_relu in the body of If outer_if" in message
    assert "Neg" not in message.split("Op types present")[0]
    with pytest.raises(ProbeMatchError) as err:
        add_probes(model, "Conv")
    assert "control-flow" not in str(err.value)


def test_empty_attach_to(cnn):
    with pytest.raises(ProbeMatchError):
        add_probes(cnn, [])


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


def test_an_attach_to_entry_that_matches_nothing_warns_and_the_others_are_probed(cnn):
    with pytest.warns(UserWarning, match=r"\['Dropout'\] matched nothing in the ONNX graph") as caught:
        _, probes = add_probes(cnn, ["Conv", "Dropout"])
    assert len([w for w in caught if "matched nothing" in str(w.message)]) == 1
    assert [p.tensor_name for p in probes] == ["c", "c2"]


# ------------------------------------------------------------- framework names


def _without_metadata(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without node metadata (as a plain exporter writes it)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        del node.metadata_props[:]
    return copy


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
def keras_like(initializer) -> onnx.ModelProto:
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
    inits = [initializer("w1", 4, 3, 3, 3), initializer("w4", 64, 5), initializer("w6", 5, 2)]
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


def test_nodes_matched_by_op_type_are_named_by_module_and_op(keras_like):
    """A node inside a layer is ``<layer>/<op>``, unless its tensor is the layer's own
    (the Relu ending conv1 and dense): then it is the layer's probe name."""
    _, probes = add_probes(keras_like, ["Conv", "Relu"])
    assert [(p.name, p.label, p.op_type) for p in probes] == [
        ("conv1/Conv:after", "conv1/Conv", "Conv"), ("conv1:after", "conv1", "Relu"),
        ("dense:after", "dense", "Relu"),
    ]  # fmt: skip
    _, by_layer = add_probes(keras_like, ["conv1", "dense"])
    assert [(p.name, p.tensor_name) for p in by_layer] == [(p.name, p.tensor_name) for p in probes[1:]]


def test_op_matches_inside_a_module_say_which_tensor(initializer):
    """A hand-built attention-like module ``blk.attn`` (torch metadata): its two MatMuls
    are ``blk.attn/MatMul#1`` and ``#2``, its Softmax ``blk.attn/Softmax``, the Add that
    ends it is the module's own tensor (``blk.attn``), a node outside every module keeps
    its ONNX name; names are unique and the same on every rewrite."""

    def node(op, inputs, output, scopes):
        made = helper.make_node(op, inputs, [output], name=f"node_{output}")
        if scopes:
            names = ["", *scopes, output]
            classes = ["Net", *(f"torch.nn.{s.rsplit('.', 1)[-1].title()}" for s in scopes), op]
            helper.set_metadata_props(
                made, {"pkg.torch.onnx.name_scopes": repr(names), "pkg.torch.onnx.class_hierarchy": repr(classes)}
            )
        return made

    attn = ["blk", "blk.attn"]
    nodes = [
        node("MatMul", ["x", "wq"], "q", attn), node("MatMul", ["x", "wk"], "k", attn),
        node("Add", ["q", "k"], "qk", attn), node("Softmax", ["qk"], "p", attn),
        node("Add", ["p", "x"], "y", attn), node("MatMul", ["y", "wo"], "z", None),
    ]  # fmt: skip
    g = helper.make_graph(
        nodes, "attn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 8])],
        [initializer(name, 8, 8) for name in ("wq", "wk", "wo")],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    _, probes = add_probes(model, ["MatMul", "Softmax", "Add"])
    assert [(p.name, p.tensor_name) for p in probes] == [
        ("blk.attn/MatMul#1:after", "q"), ("blk.attn/MatMul#2:after", "k"),
        ("blk.attn/Add#1:after", "qk"), ("blk.attn/Softmax:after", "p"),
        ("blk.attn:after", "y"), ("node_z:after", "z"),
    ]  # fmt: skip
    _, again = add_probes(model, ["MatMul", "Softmax", "Add"])
    assert [p.name for p in again] == [p.name for p in probes]
    _, before = add_probes(model, "MatMul", method="before")  # both read x, the module's input
    assert [(p.name, p.tensor_name) for p in before] == [("blk.attn:before", "x"), ("node_z:before", "y")]
    _, by_module = add_probes(model, "blk.attn")  # a module match is named as before
    assert [(p.name, p.tensor_name) for p in by_module] == [("blk.attn:after", "y")]


def test_tf2onnx_names_without_suffix(initializer):
    names = [
        ("model/conv1/transpose", "Transpose"), ("model/conv1/Conv2D", "Conv"),
        ("model/conv1/Relu", "Relu"), ("StatefulPartitionedCall/model/flat/Reshape", "Flatten"),
    ]  # fmt: skip
    model = _named_chain(names, [initializer("w1", 4, 3, 3, 3)])
    _, probes = add_probes(model, ["conv1", "flat"])
    assert [(p.name, p.op_type) for p in probes] == [
        ("conv1:after", "Relu"), ("flat:after", "Flatten"),
    ]  # fmt: skip


def test_torch_style_metadata_and_legacy_names(initializer):
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
        [initializer("features.0.weight", 4, 3, 1, 1)],
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


def test_keras_layer_metadata(tf2onnx_style):
    """from_keras tags each node with its Keras layer: the layer name is the label (as on
    the native path), the class name and class path select it too, the tf2onnx scope
    is an alias, and the model's inputs count as channels-last."""
    model = tf2onnx_style("")
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


# ---------------------------------------------------------------- real exports


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


def _assert_fired(fired: np.ndarray, values: np.ndarray) -> None:
    """A probe output (``tensor > 0``, bool) against the framework's own values of the
    tensor, away from zero (exact zeros of a ReLU included), where the runtimes'
    rounding cannot flip a state."""
    assert fired.dtype == np.bool_ and fired.shape == values.shape
    clear = (np.abs(values) > 1e-5) | (values == 0)
    assert clear.mean() > 0.9
    assert np.array_equal(fired[clear], values[clear] > 0)


@pytest.mark.parametrize("kind", ["dynamo", "dynamo_opt", "legacy"])
def test_torch_export_values(torch_exports, kind, run):
    paths, x, hidden = torch_exports
    rewritten, probes = add_probes(paths[kind], ["features.0", "conv1"])
    names = {p.label: p.output_name for p in probes}
    for level in ALL_LEVELS:
        out = run(rewritten, {"x": x}, level)
        reference = run(paths[kind], {"x": x}, level)
        assert all(np.array_equal(reference[k], out[k]) for k in reference)
        _assert_fired(out[names["conv1"]], hidden["conv1"])
    if kind == "dynamo":  # unfused: features.0 is the Conv before BatchNorm
        _assert_fired(out[names["features.0"]], hidden["features.0"])


def test_keras_export(tmp_path, run):
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
    reference, out = run(str(path), {input_name: x}), run(rewritten, {input_name: x})
    assert all(np.array_equal(reference[k], out[k]) for k in reference)
    conv1 = keras.Model(inp, model.get_layer("conv1").output)(x).numpy()
    _assert_fired(np.moveaxis(out[probes[1].output_name], 1, -1), conv1)


def test_keras_classes_select_the_native_layers(keras_lenet, assert_same_states):
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
        assert_same_states(native_capture, probe)


@pytest.fixture(scope="module")
def legacy_mobilenet():
    """The MobileNetV2-style torch model and its legacy (TorchScript) export."""
    torch = pytest.importorskip("torch")
    from tensorstate_onnx.converters import from_torch
    from models.torch_models import MobileNetV2Small

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
            resolved = parse_list(meta["pkg.torch.onnx.name_scopes"])[1:-1]
            assert labels == resolved, node.name
            compared += 1
    assert compared > 80
    labels = {label for node_labels in derived for label in node_labels}
    assert labels <= set(dict(net.named_modules()))
    assert {"features.1.conv.0", "features.1.conv.0.0", "features.2.conv.1.0"} <= labels


def test_torch_legacy_nested_modules_match_hooks(legacy_mobilenet, assert_same_states):
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
        assert_same_states(hook, probes[name])
    remove_state_layers(net)


# ------------------------------------------------------- framework names vs op types, root


def test_framework_names_win_over_op_types(torch):
    """A module class that is also an op type ("Add") names the modules: the Add node
    outside them is left out, with a warning that says how to probe it."""
    from tensorstate_onnx.converters import from_torch

    class Add(torch.nn.Module):
        def forward(self, x):
            return x + 1.0

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.plus = Add()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.plus(x)) + x

    exported = from_torch(Net().eval(), torch.zeros(2, 4))
    with pytest.warns(UserWarning, match=r"'Add' names framework modules.*\(plus\).*1 Add node"):
        _, probes = add_probes(exported, ["Add"])
    assert [p.name for p in probes] == ["plus:after"]
    names = [n["name"] for n in list_nodes(exported) if n["op_type"] == "Add" and not n["labels"]]
    _, probes = add_probes(exported, names)  # the outside node, by name
    assert [p.op_type for p in probes] == ["Add"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, probes = add_probes(exported, ["Net"], method="both")  # the root module
    assert [(p.name, p.tensor_name) for p in probes] == [
        ("Net:before", exported.graph.input[0].name), ("Net:after", exported.graph.output[0].name),
    ]  # fmt: skip


def _torch_node(op, inputs, output, module, cls):
    node = helper.make_node(op, inputs, [output], name=f"node_{output}")
    helper.set_metadata_props(node, {
        "pkg.torch.onnx.name_scopes": str(["", module, output]),
        "pkg.torch.onnx.class_hierarchy": str(["__main__.Net", cls, "aten.op"]),
    })  # fmt: skip
    return node


def test_calls_of_a_module_are_split_where_its_output_went_on(initializer):
    """A module's nodes split into calls only where the nodes between them read what
    it computed; a node in between that does not (a hoisted Shape) keeps one call."""
    relu = "torch.nn.modules.activation.ReLU"
    nodes = [
        _torch_node("Relu", ["x"], "a", "act", relu),
        _torch_node("Shape", ["x"], "shape", "other", "torch.nn.modules.linear.Identity"),
        _torch_node("Neg", ["a"], "b", "act", relu),  # still the first call
        _torch_node("Conv", ["b", "W"], "c", "conv", "torch.nn.modules.conv.Conv2d"),
        _torch_node("Relu", ["c"], "d", "act", relu),  # the second call
    ]
    g = helper.make_graph(
        nodes, "torch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, ["N", 3, 4, 4]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [4])],
        [initializer("W", 3, 3, 1, 1)],
    )  # fmt: skip
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    _, probes = add_probes(model, ["act"], method="both")
    assert [(p.name, [c.tensor_name for c in p.each_call()]) for p in probes] == [
        ("act:before", ["x", "c"]), ("act:after", ["b", "d"]),
    ]  # fmt: skip
