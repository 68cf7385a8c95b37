"""Tests of ``build_efficiency_model`` / ``reset_efficiency_model`` on the ONNX path,
and of the dispatch rules that keep ONNX-only options off the native front ends."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tensorstate_onnx import (
    NoStatesError,
    OptionError,
    StorageExistsError,
    OnnxEfficiencyModel,
    build_efficiency_model,
    demo,
    network_efficiency,
    reset_efficiency_model,
)
from tensorstate_onnx.api import model_kind


def _counts(capture) -> dict[bytes, int]:
    return dict(zip(capture.state_ids(), capture.counts().tolist(), strict=True))


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return demo.load_test_data()[0][:80]


@pytest.fixture(scope="module")
def reference(demo_model, x) -> list[dict[bytes, int]]:
    """Per-Conv counts from plain onnxruntime and numpy."""
    copy = onnx.ModelProto()
    copy.CopyFrom(demo_model)
    for node in demo_model.graph.node:
        if node.op_type == "Conv":
            copy.graph.output.append(helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None))
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    result = []
    for tensor in session.run(None, {"input": x})[1:]:
        c = tensor.shape[1]
        rows = np.packbits(np.moveaxis(tensor, 1, -1).reshape(-1, c) > 0, axis=-1, bitorder="little")
        ids, counts = np.unique(rows, axis=0, return_counts=True)
        result.append({r.tobytes(): int(n) for r, n in zip(ids, counts, strict=True)})
    return result


@pytest.mark.parametrize("source", ["str", "Path", "proto"])
def test_onnx_path_or_proto_gives_an_onnx_efficiency_model(demo_model, x, reference, source):
    before = demo_model.SerializeToString()
    model = {"str": str(demo.model_path()), "Path": Path(demo.model_path()), "proto": demo_model}[source]
    assert model_kind(model) == "onnx"
    built = build_efficiency_model(model, "Conv", providers="cpu")
    assert isinstance(built, OnnxEfficiencyModel)
    built.predict(x, progress=False)
    assert [_counts(c) for c in built.efficiency_layers] == reference
    assert demo_model.SerializeToString() == before


def test_positional_arguments_and_options_pass_through(demo_model, x, reference, tmp_path):
    built = build_efficiency_model(
        demo_model, ["Conv"], ["conv2"], "both", tmp_path / "store",
        providers="cpu", optimization="disable", pack_in_graph=True, threads=1,
    )  # fmt: skip
    assert [p.name for p in built.probes] == ["conv1:before", "conv1:after", "conv3:before", "conv3:after"]
    assert all(p.packed_in_graph for p in built.probes)
    assert built.providers == ["CPUExecutionProvider"]
    options = built.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.intra_op_num_threads == 1
    built.predict(x, progress=False)
    assert _counts(built.efficiency_layers[1]) == reference[0]
    assert _counts(built.efficiency_layers[3]) == reference[2]
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == [
        "conv1_after", "conv1_before", "conv3_after", "conv3_before",
    ]  # fmt: skip
    assert built.efficiency_layers[0].states.shape == (x.size, 1)


def test_channel_axes_and_keep_states_pass_through(demo_model, x):
    built = build_efficiency_model(
        demo_model, "conv3", providers="cpu", channel_axes={"conv3:after": 0}, keep_states=True,
    )  # fmt: skip
    built.predict(x, progress=False)
    (capture,) = built.efficiency_layers
    assert built.probes[0].channel_axis == 0
    assert capture.max_entropy() == len(x)  # neurons are now the batch axis
    assert capture.states.shape[0] == capture.state_count == 100


def test_unknown_option_is_a_type_error(demo_model):
    with pytest.raises(TypeError, match="unexpected keyword argument 'provider'"):
        build_efficiency_model(demo_model, "Conv", provider="cpu")


def test_bad_runtime_and_method(demo_model):
    with pytest.raises(ValueError, match="runtime must be None, 'native' or 'onnxruntime', got 'tensorrt'"):
        build_efficiency_model(demo_model, "Conv", runtime="tensorrt")
    with pytest.raises(OptionError, match="method must be one of before, after, both; got 'sideways'"):
        build_efficiency_model(demo_model, "Conv", method="sideways")


@pytest.mark.parametrize("model", [object(), [1, 2], None, 3.5, b"bytes"], ids=["object", "list", "None", "float", "bytes"])
def test_unsupported_model_type_names_the_supported_ones(model):
    name = type(model).__qualname__
    with pytest.raises(TypeError, match=rf"unsupported model type builtins\.{name}; .*onnx\.ModelProto, a path to an \.onnx file, a keras\.Model or a torch\.nn\.Module"):
        build_efficiency_model(model, "Conv")


def test_reset_efficiency_model(demo_model, x, reference):
    built = build_efficiency_model(demo_model, "Conv", providers="cpu")
    built.predict(x, progress=False)
    assert [c.state_count for c in built.efficiency_layers] == [80 * 576, 80 * 64, 80]
    assert reset_efficiency_model(built) is None
    assert [c.state_count for c in built.efficiency_layers] == [0, 0, 0]
    with pytest.raises(NoStatesError, match="recorded no states yet"):
        built.efficiency_layers[0].efficiency()
    built.predict(x, progress=False)
    assert [_counts(c) for c in built.efficiency_layers] == reference


def test_reset_efficiency_model_needs_efficiency_layers():
    with pytest.raises(ValueError, match="object has no efficiency_layers; build it with build_efficiency_model first"):
        reset_efficiency_model(object())


def test_network_efficiency_is_the_geometric_mean_of_layer_efficiencies(demo_model, x, reference):
    built = build_efficiency_model(demo_model, "Conv", providers="cpu")
    built.predict(x, progress=False)
    expected = []
    for counts, neurons in zip(reference, (20, 50, 100), strict=True):
        p = np.array(list(counts.values()), dtype=np.float64) / sum(counts.values())
        expected.append(float(-(p * np.log2(p)).sum()) / neurons)
    layers = [c.efficiency() for c in built.efficiency_layers]
    assert layers == pytest.approx(expected, rel=1e-12)
    assert network_efficiency(built) == pytest.approx(math.prod(expected) ** (1 / 3), rel=1e-12)
    assert network_efficiency(built) == pytest.approx(network_efficiency(layers), rel=1e-15)


def test_onnx_options_on_a_native_torch_module_are_refused():
    pytest.importorskip("torch")
    from models.torch_models import lenet5

    module = lenet5()
    assert model_kind(module) == "torch"
    with pytest.raises(TypeError, match=r"options \['pack_in_graph', 'providers'\] only apply to the ONNX path \(runtime='onnxruntime'\)"):
        build_efficiency_model(module, "Conv2d", providers="cpu", pack_in_graph=True)
    with pytest.raises(TypeError, match=r"options \['optimization'\] only apply to the ONNX path"):
        build_efficiency_model(module, "Conv2d", runtime="native", optimization="all")
    assert not module._forward_hooks and not any(m._forward_hooks for m in module.modules())


def test_onnx_options_on_a_native_keras_model_are_refused():
    pytest.importorskip("keras")
    from models.keras_models import lenet5

    model = lenet5()
    assert model_kind(model) == "keras"
    with pytest.raises(TypeError, match=r"options \['providers'\] only apply to the ONNX path \(runtime='onnxruntime'\)"):
        build_efficiency_model(model, "Conv2D", providers="cpu")


def test_keep_states_and_overwrite_reach_the_native_torch_hooks(tmp_path):
    torch = pytest.importorskip("torch")
    from models.torch_models import lenet5
    from tensorstate_onnx.torch_capture import remove_state_layers

    module = lenet5().eval()
    built = build_efficiency_model(module, "Conv2d", keep_states=False)
    with torch.no_grad():
        module(torch.randn(3, 1, 28, 28))
    assert [c.state_count for c in built.efficiency_layers] == [3 * 24 * 24, 3 * 8 * 8, 3]
    with pytest.raises(NoStatesError, match="does not keep"):
        built.efficiency_layers[0].states
    remove_state_layers(module)

    (tmp_path / "conv1_after").mkdir()
    with pytest.raises(StorageExistsError):
        build_efficiency_model(lenet5(), "Conv2d", storage_path=tmp_path)
    stored = build_efficiency_model(lenet5(), "Conv2d", storage_path=tmp_path, overwrite=True)
    assert len(stored.efficiency_layers) == 3


def test_keep_states_reaches_the_native_keras_layers():
    pytest.importorskip("keras")
    from models.keras_models import lenet5

    built = build_efficiency_model(lenet5(), "Conv2D", keep_states=False)
    built.predict(np.random.default_rng(0).standard_normal((2, 28, 28, 1)).astype("float32"), verbose=0)
    assert [c.state_count for c in built.efficiency_layers] == [2 * 24 * 24, 2 * 8 * 8, 2]
    with pytest.raises(NoStatesError, match="does not keep"):
        built.efficiency_layers[0].states
