"""Tests of the onnxruntime runner ``OnnxEfficiencyModel``.

Every count is checked against an independent reference: a plain onnxruntime
session of a copy of the model whose probed tensors were appended as graph
outputs by hand (``onnx.helper``, not :mod:`tensorstate_onnx.graph`), quantized
and packed with numpy.
"""

from __future__ import annotations

import collections
import math
import tempfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from tensorstate_onnx import OnnxEfficiencyModel, demo
from tensorstate_onnx.data import CACHED_BATCH_BYTES, cache_sized_batch
from tensorstate_onnx.errors import (
    ModelFileError,
    ModelInputError,
    NoStatesError,
    OptionError,
    OptionTypeError,
    ProbeMatchError,
    ProviderError,
    StorageExistsError,
)
from models.onnx_models import mobilenet_v2_small_onnx
from tensorstate_onnx.store import StateStore

LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}
MOBILENET_SAMPLES = 12


# ---------------------------------------------------------------- reference


def _plain_session(model: onnx.ModelProto, optimization: str, extra_outputs=()) -> ort.InferenceSession:
    """A CPU session of a copy of ``model`` with ``extra_outputs`` appended as graph outputs."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for name in extra_outputs:
        copy.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[optimization]
    return ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _run_plain(session: ort.InferenceSession, x: np.ndarray, batch_size: int | None = None) -> list[np.ndarray]:
    """Every output of ``session`` over ``x``, run in batches of ``batch_size`` and joined."""
    size = batch_size or len(x)
    name = session.get_inputs()[0].name
    runs = [session.run(None, {name: x[i : i + size]}) for i in range(0, len(x), size)]
    return [np.concatenate([run[k] for run in runs]) for k in range(len(runs[0]))]


def _reference_rows(tensor: np.ndarray) -> np.ndarray:
    """Packed states of an NCHW (or NC) tensor: channels on axis 1."""
    c = tensor.shape[1]
    return np.packbits(np.moveaxis(tensor, 1, -1).reshape(-1, c) > 0, axis=-1, bitorder="little")


def _reference_counts(tensor: np.ndarray) -> dict[bytes, int]:
    ids, counts = np.unique(_reference_rows(tensor), axis=0, return_counts=True)
    return {row.tobytes(): int(n) for row, n in zip(ids, counts, strict=True)}


def _counts(capture, index=None) -> dict[bytes, int]:
    return dict(zip(capture.state_ids(index), capture.counts(index).tolist(), strict=True))


def _conv_tensors(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of the model's Conv nodes, read straight from the graph."""
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    return [node.input[0] for node in convs], [node.output[0] for node in convs]


def _reference_tensors(model, x, optimization, names, batch_size=None) -> dict[str, np.ndarray]:
    """Values of ``names`` (graph inputs are taken from ``x``) under plain onnxruntime."""
    inputs = {value.name for value in model.graph.input}
    computed = [name for name in names if name not in inputs]
    values = _run_plain(_plain_session(model, optimization, computed), x, batch_size)
    n_out = len(model.graph.output)
    found = dict(zip(computed, values[n_out:], strict=True))
    return {name: x if name in inputs else found[name] for name in names}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def mobilenet() -> onnx.ModelProto:
    return mobilenet_v2_small_onnx()


@pytest.fixture(scope="module")
def mobile_x() -> np.ndarray:
    return np.random.default_rng(7).standard_normal((MOBILENET_SAMPLES, 3, 96, 96)).astype(np.float32)


@pytest.fixture(scope="module")
def networks(demo_model, demo_data, mobilenet, mobile_x):
    """name -> (model, inputs, batch size)."""
    return {"demo": (demo_model, demo_data[0], 64), "mobilenet": (mobilenet, mobile_x, 5)}


def _build(model, **options) -> OnnxEfficiencyModel:
    options.setdefault("providers", "cpu")
    return OnnxEfficiencyModel(model, options.pop("attach_to", "Conv"), **options)


# ---------------------------------------------------------------- outputs


def test_a_model_with_a_fixed_batch_is_fed_batches_of_that_size(fixed_batch_relu):
    x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    rows = np.packbits(x > 0, axis=-1, bitorder="little")
    want = sorted(np.unique(rows, axis=0, return_counts=True)[1].tolist())
    one = _build(fixed_batch_relu(1), attach_to="Relu")
    assert one.fixed_batch_size == 1
    assert np.array_equal(one.predict(x, progress=False), np.maximum(x, 0))
    assert sorted(one.efficiency_layers[0].counts().tolist()) == want
    two = _build(fixed_batch_relu(2), attach_to="Relu")
    assert np.array_equal(two.predict(iter([x[:4], x[4:]]), progress=False), np.maximum(x, 0))  # 4 is split in two
    assert sorted(two.efficiency_layers[0].counts().tolist()) == want
    labels = np.maximum(x, 0).argmax(1)
    assert _build(fixed_batch_relu(1), attach_to="Relu").evaluate((x, labels), progress=False) == 1.0


def _dynamic_map_conv() -> onnx.ModelProto:
    """A Conv whose feature map has no fixed size (``[N, 1, H, W]``)."""
    weight = helper.make_tensor("w", onnx.TensorProto.FLOAT, [8, 1, 3, 3], np.ones(72, np.float32))
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])], "dynamic_map",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 1, "h", "w"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 8, "h", "w"])], [weight],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_default_batch_keeps_a_batch_of_probe_outputs_in_cache(mobilenet, mobile_x, demo_model):
    """Without batch_size, arrays are split into batches whose probe outputs
    fit in CACHED_BATCH_BYTES on CPU; models whose probe outputs have axes of
    unknown size keep 256, and so do small ones (LeNet-5)."""
    probed = _build(mobilenet)
    per_sample = sum(
        int(np.prod(arg.shape[1:])) for arg in probed.session.get_outputs() if arg.name in {p.output_name for p in probed.probes}
    )  # bool outputs: one byte a value
    assert per_sample > CACHED_BATCH_BYTES // 256
    assert probed.default_batch_size == cache_sized_batch(per_sample) < 256
    sizes = []
    run = probed.session.run
    probed.session.run = lambda names, feed: sizes.append(next(iter(feed.values())).shape[0]) or run(names, feed)
    x = np.concatenate([mobile_x] * (probed.default_batch_size // len(mobile_x) + 1))
    probed.predict(x, progress=False)
    step = probed.default_batch_size
    assert sizes == [min(step, len(x) - start) for start in range(0, len(x), step)]
    assert len(sizes) > 1
    assert _build(mobilenet, pack_in_graph=True).default_batch_size == 256  # states, not samples, on the first axis
    assert _build(demo_model).default_batch_size == 256
    assert _build(_dynamic_map_conv()).default_batch_size == 256


def test_predict_without_outputs_records_the_same_states(demo_model, demo_data):
    x = demo_data[0][:40]
    kept, counted = _build(demo_model), _build(demo_model)
    assert kept.predict(x, batch_size=16, progress=False).shape == (40, 10)
    assert counted.predict(x, batch_size=16, progress=False, keep_outputs=False) is None
    for a, b in zip(kept.efficiency_layers, counted.efficiency_layers, strict=True):
        assert sorted(a.counts().tolist()) == sorted(b.counts().tolist()) and a.state_count == b.state_count


def test_a_fixed_batch_model_refuses_what_does_not_fill_its_batches(fixed_batch_relu):
    x = np.ones((3, 4), np.float32)
    two = _build(fixed_batch_relu(2), attach_to="Relu")
    with pytest.raises(OptionError, match=r"takes batches of exactly 2 .*batch_size=1 cannot be used"):
        two.predict(x[:2], batch_size=1, progress=False)
    with pytest.raises(ModelInputError, match="takes batches of exactly 2 samples, but the data holds 3; give a multiple of 2"):
        two.predict(x, progress=False)
    assert two.efficiency_layers[0].state_count == 0, "refused before any batch ran"
    with pytest.raises(ModelInputError, match="but the data gave a batch of 3"):
        two.predict(iter([x]), progress=False)


def test_a_rank_1_input_takes_an_empty_sequence_as_onnxruntime_does():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")], "sequence",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["L"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["L"])],
    )  # fmt: skip
    probed = _build(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), attach_to="Relu")
    (empty,) = probed.run(np.zeros(0, np.float32))
    assert empty.shape == (0,) and probed.efficiency_layers[0].state_count == 0
    (y,) = probed.run(np.array([1.0, -2.0, 3.0], np.float32))
    assert np.array_equal(y, [1.0, 0.0, 3.0])
    assert sorted(probed.efficiency_layers[0].counts().tolist()) == [1, 2]  # one neuron a position


def _masked_tokens_model() -> onnx.ModelProto:
    """x [B, T, 4] -> MatMul -> Relu -> y [B, T, 3]; mask [B, T] (int64) is an input the graph ignores."""
    weights = onnx.numpy_helper.from_array(np.random.default_rng(5).normal(size=(4, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Relu", ["h"], ["y"], name="act"),
         helper.make_node("Identity", ["mask"], ["mask_out"], name="keep_mask")],
        "tokens",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", "T", 4]),
         helper.make_tensor_value_info("mask", onnx.TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["B", "T", 3]),
         helper.make_tensor_value_info("mask_out", onnx.TensorProto.INT64, ["B", "T"])],
        initializer=[weights],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_a_mask_input_leaves_padded_positions_out_of_states_and_accuracy():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 7, 4)).astype(np.float32)
    mask = (np.arange(7)[None, :] < rng.integers(1, 8, size=(5, 1))).astype(np.int64)  # padding at the end
    model = _masked_tokens_model()
    probed = _build(model, attach_to="Relu", mask_input="mask", keep_states=True)
    y, _ = probed.predict({"x": x, "mask": mask}, batch_size=2, progress=False)
    capture = probed.efficiency_layers[0]
    real = mask.astype(bool)
    assert capture.state_count == int(real.sum())
    assert sorted(capture.counts().tolist()) == _reference_counts_of(y[real])
    for i in range(5):  # per-instance counts stay aligned with the samples
        assert sorted(capture.counts(index=[i]).tolist()) == _reference_counts_of(y[i][real[i]])
    labels = y.argmax(-1)
    labels[~real] = (labels[~real] + 1) % 3  # wrong only at padded positions
    scored = _build(model, attach_to="Relu", mask_input="mask")
    assert scored.evaluate(({"x": x, "mask": mask}, labels), progress=False) == 1.0
    labels[~real] = -100  # Hugging Face's padding label: not checked where the mask is 0
    assert scored.evaluate(({"x": x, "mask": mask}, labels), progress=False) == 1.0
    with pytest.raises(ModelInputError, match="no prediction to score: every position was padding"):
        scored.evaluate(({"x": x, "mask": np.zeros_like(mask)}, labels), progress=False)


def test_a_mask_that_does_not_fit_a_probe_or_the_model_is_refused():
    with pytest.raises(ModelInputError, match=r"mask_input 'attention_mask' is not an input .*\['x', 'mask'\]"):
        _build(_masked_tokens_model(), attach_to="Relu", mask_input="attention_mask")
    probed = _build(_masked_tokens_model(), attach_to="Relu", mask_input="mask")
    with pytest.raises(ModelInputError, match="does not fit probe 'act:after'"):
        probed.predict({"x": np.ones((2, 3, 4), np.float32), "mask": np.ones((2, 5), np.int64)}, progress=False)


def test_a_mask_applies_to_a_probe_that_sees_the_positions_flattened():
    """[B, T, 4] -> Reshape [B*T, 4] -> MatMul -> Relu, as mixture-of-experts layers see tokens."""
    weights = onnx.numpy_helper.from_array(np.random.default_rng(7).normal(size=(4, 3)).astype(np.float32), "w")
    shape = onnx.numpy_helper.from_array(np.array([-1, 4], np.int64), "flat")
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "flat"], ["tokens"], name="flatten"),
         helper.make_node("MatMul", ["tokens", "w"], ["h"], name="fc"), helper.make_node("Relu", ["h"], ["y"], name="act"),
         helper.make_node("Identity", ["mask"], ["mask_out"], name="keep_mask")],
        "flat_tokens",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["B", "T", 4]),
         helper.make_tensor_value_info("mask", onnx.TensorProto.INT64, ["B", "T"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["BT", 3]),
         helper.make_tensor_value_info("mask_out", onnx.TensorProto.INT64, ["B", "T"])],
        initializer=[weights, shape],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    rng = np.random.default_rng(8)
    x = rng.normal(size=(5, 7, 4)).astype(np.float32)
    mask = (np.arange(7)[None, :] < rng.integers(1, 8, size=(5, 1))).astype(np.int64)
    probed = _build(model, attach_to="Relu", mask_input="mask", keep_states=True)
    y, _ = probed.predict({"x": x, "mask": mask}, batch_size=2, progress=False)
    real = mask.astype(bool).reshape(-1)
    capture = probed.efficiency_layers[0]
    assert capture.state_count == int(real.sum()) < real.size  # padding left out, as on [B, T, F]
    assert sorted(capture.counts().tolist()) == _reference_counts_of(y[real])


def _reference_counts_of(rows: np.ndarray) -> list[int]:
    packed = np.packbits(rows > 0, axis=-1, bitorder="little")
    return sorted(np.unique(packed, axis=0, return_counts=True)[1].tolist())


def test_a_scalar_output_comes_back_one_value_per_batch():
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu"),
         helper.make_node("ReduceSum", ["y"], ["total"], name="sum", keepdims=0)],
        "scalar_output",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_value_info("total", onnx.TensorProto.FLOAT, [])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
    probed = _build(model, attach_to="Relu")
    y, total = probed.predict(x, batch_size=4, progress=False)
    assert np.array_equal(y, np.maximum(x, 0))
    relu = np.maximum(x, 0)
    assert np.allclose(total, [relu[0:4].sum(), relu[4:8].sum(), relu[8:].sum()], rtol=1e-6)
    assert probed.efficiency_layers[0].state_count == 10


@pytest.mark.parametrize("pack_in_graph", [False, True], ids=["host-pack", "graph-pack"])
@pytest.mark.parametrize("optimization", ["all", "disable"])
@pytest.mark.parametrize("network", ["demo", "mobilenet"])
def test_predict_outputs_are_bit_identical_to_plain_onnxruntime(networks, network, optimization, pack_in_graph):
    model, x, batch = networks[network]
    probed = _build(model, optimization=optimization, pack_in_graph=pack_in_graph)
    got = probed.predict(x, batch_size=batch, progress=False)
    (expected,) = _run_plain(_plain_session(model, optimization), x, batch)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got, expected)
    assert len(probed.efficiency_layers) == len(_conv_tensors(model)[1])


# ---------------------------------------------------------------- counts


def _assert_counts_match_reference(probed, reference):
    """Counts, N*H*W states and C neurons of every probe, as in the reference tensors."""
    for probe, capture in zip(probed.probes, probed.efficiency_layers, strict=True):
        tensor = reference[probe.tensor_name]
        assert _counts(capture) == _reference_counts(tensor), probe.name
        n, c, *spatial = tensor.shape
        assert capture.state_count == n * math.prod(spatial)
        assert capture.states_per_instance == math.prod(spatial)
        assert capture.max_entropy() == c


@pytest.mark.parametrize(
    "network, optimization",
    [("demo", "all"), ("demo", "disable"), ("mobilenet", "disable")],
)
def test_counts_equal_reference_with_host_and_graph_packing(networks, network, optimization):
    model, x, batch = networks[network]
    _, outputs = _conv_tensors(model)
    reference = _reference_tensors(model, x, optimization, outputs, batch)
    for pack_in_graph in (False, True):
        probed = _build(model, optimization=optimization, pack_in_graph=pack_in_graph)
        probed.predict(x, batch_size=batch, progress=False)
        assert sorted(p.tensor_name for p in probed.probes) == sorted(outputs)
        assert all(p.packed_in_graph is pack_in_graph for p in probed.probes)
        _assert_counts_match_reference(probed, reference)


def test_mobilenet_counts_at_full_optimization(mobilenet, mobile_x):
    """At level "all" the probed model still lets onnxruntime fuse Conv+BN+Clip on the
    main path (the probe reads an unfused duplicate of each Conv), while the hand-made
    reference blocks those fusions by exposing every Conv output. Upstream values
    therefore differ in the last float bits, which can flip a handful of near-zero
    neurons: totals are exact, the distributions agree to within 0.1% of the states.
    Host and in-graph packing see the same tensors and agree exactly."""
    _, outputs = _conv_tensors(mobilenet)
    reference = _reference_tensors(mobilenet, mobile_x, "all", outputs, 4)
    host = _build(mobilenet, optimization="all")
    graph = _build(mobilenet, optimization="all", pack_in_graph=True)
    host.predict(mobile_x, batch_size=4, progress=False)
    graph.predict(mobile_x, batch_size=4, progress=False)
    for probe, capture, packed in zip(host.probes, host.efficiency_layers, graph.efficiency_layers, strict=True):
        tensor = reference[probe.tensor_name]
        n, _, h, w = tensor.shape
        assert capture.state_count == packed.state_count == n * h * w
        got = collections.Counter(_counts(capture))
        want = collections.Counter(_reference_counts(tensor))
        differing = sum(((got - want) + (want - got)).values())
        assert differing <= 0.001 * capture.state_count, probe.name
        assert _counts(packed) == dict(got), probe.name


def test_method_both_probes_conv_inputs_and_outputs(demo_model, demo_data):
    x = demo_data[0][:100]
    inputs, outputs = _conv_tensors(demo_model)
    probed = _build(demo_model, method="both")
    probed.predict(x, batch_size=32, progress=False)
    names = [p.name for p in probed.probes]
    assert names == ["conv1:before", "conv1:after", "conv2:before", "conv2:after", "conv3:before", "conv3:after"]
    assert [p.tensor_name for p in probed.probes] == [t for pair in zip(inputs, outputs, strict=True) for t in pair]
    assert [p.method for p in probed.probes] == ["before", "after"] * 3
    reference = _reference_tensors(demo_model, x, "all", inputs + outputs)
    _assert_counts_match_reference(probed, reference)
    # the first "before" probe watches the model input itself: one neuron per pixel
    assert probed.efficiency_layers[0].state_count == x.size


@pytest.mark.parametrize("network, sizes", [("demo", (1, 7, 64, None)), ("mobilenet", (1, 7, None))])
def test_results_do_not_depend_on_batch_size(networks, network, sizes):
    model, x, _ = networks[network]
    results = []
    for size in sizes:
        probed = _build(model)
        out = probed.predict(x, batch_size=size, progress=False)
        results.append((out, [_counts(c) for c in probed.efficiency_layers], [c.state_count for c in probed.efficiency_layers]))
    first = results[0]
    for out, counts, totals in results[1:]:
        assert np.array_equal(out, first[0])
        assert counts == first[1]
        assert totals == first[2]


def test_overlapped_predict_equals_run_batch_by_batch(demo_model, demo_data, tmp_path):
    x = demo_data[0]
    streamed = _build(demo_model, storage_path=tmp_path / "streamed")
    stepped = _build(demo_model, storage_path=tmp_path / "stepped")
    out = streamed.predict(iter([x[i : i + 40] for i in range(0, len(x), 40)]), progress=False)
    stepped_out = np.concatenate([stepped.run(x[i : i + 40])[0] for i in range(0, len(x), 40)])
    assert np.array_equal(out, stepped_out)
    for a, b in zip(streamed.efficiency_layers, stepped.efficiency_layers, strict=True):
        assert a.state_count == b.state_count
        assert _counts(a) == _counts(b)
        assert np.array_equal(a.states[:], b.states[:])


@pytest.mark.parametrize("pack_in_graph", [False, True], ids=["host-pack", "graph-pack"])
def test_io_binding_reuses_buffers_and_changes_nothing(demo_model, demo_data, tmp_path, pack_in_graph):
    """With reused probe buffers, batch k must be counted before batch k + 2 overwrites it."""
    x = demo_data[0]
    batches = [x[i : i + size] for i, size in zip(range(0, 360, 40), (40, 40, 40, 17, 40, 40, 40, 40, 40), strict=True)]
    results = []
    for io_binding in (False, True):
        probed = _build(
            demo_model, io_binding=io_binding, pack_in_graph=pack_in_graph,
            storage_path=tmp_path / f"binding-{io_binding}", method="both",
        )  # fmt: skip
        assert (probed._runner is not None) is io_binding
        out = probed.predict(iter(batches), progress=False)
        results.append((out, probed))
    (plain_out, plain), (bound_out, bound) = results
    assert np.array_equal(plain_out, bound_out)
    assert np.array_equal(bound_out, _run_plain(_plain_session(demo_model, "all"), np.concatenate(batches))[0])
    for a, b in zip(plain.efficiency_layers, bound.efficiency_layers, strict=True):
        assert _counts(a) == _counts(b)
        assert np.array_equal(a.states[:], b.states[:])


def test_a_large_model_runs_through_external_data(demo_model, demo_data, monkeypatch, tmp_path):
    """Over the protobuf limit the session is built from a file with external data."""
    from tensorstate_onnx.graph import io as graph_io

    small = _build(demo_model)
    expected = small.predict(demo_data[0], progress=False)
    monkeypatch.setattr(graph_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    built_from = []
    real_session = ort.InferenceSession

    def session_from(source, *args, **kwargs):
        built_from.append(source)
        return real_session(source, *args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session_from)
    large = _build(demo_model)
    assert len(built_from) == 1 and isinstance(built_from[0], str) and built_from[0].endswith("probed.onnx")
    assert np.array_equal(large.predict(demo_data[0], progress=False), expected)
    for a, b in zip(small.efficiency_layers, large.efficiency_layers, strict=True):
        assert _counts(a) == _counts(b)
    assert not any(tmp_path.iterdir())  # the temporary model files are gone


def test_io_binding_is_off_on_cpu_by_default(demo_model):
    assert _build(demo_model)._runner is None


# ---------------------------------------------------------------- storage


def test_storage_keeps_raw_states_in_order_and_reopens(demo_model, demo_data, tmp_path):
    x = demo_data[0][:50]
    root = tmp_path / "states"
    probed = _build(demo_model, storage_path=root)
    probed.predict(x, batch_size=16, progress=False)
    reference = _reference_tensors(demo_model, x, "all", _conv_tensors(demo_model)[1])
    assert sorted(p.name for p in root.iterdir()) == ["conv1_after", "conv2_after", "conv3_after"]
    for probe, capture in zip(probed.probes, probed.efficiency_layers, strict=True):
        tensor = reference[probe.tensor_name]
        rows = _reference_rows(tensor)
        assert np.array_equal(capture.states[:], rows)
        store = StateStore.open(root / probe.name.replace(":", "_"))
        assert np.array_equal(store.array[:], rows)
        meta = store.metadata
        assert meta["name"] == probe.name
        assert meta["node"] == probe.node_name == f"/{probe.label}/Conv"
        assert meta["method"] == "after"
        assert meta["op_type"] == "Conv"
        assert meta["n_neurons"] == tensor.shape[1]
        assert meta["channel_axis"] == 1
        for index in ([0], [3, 17, 49], [-1], np.arange(50)):
            picked = tensor[np.asarray(index)]
            assert _counts(capture, index) == _reference_counts(picked)


def test_stores_are_complete_only_after_a_whole_run(demo_model, demo_data, tmp_path):
    x = demo_data[0][:64]
    whole = _build(demo_model, storage_path=tmp_path / "whole")
    whole.predict(x[:32], batch_size=16, progress=False)
    stopped = _build(demo_model, storage_path=tmp_path / "stopped")

    def batches():
        yield x[:16]
        yield x[16:32]
        raise OSError("the data source went away")

    with pytest.raises(OSError, match="went away"):
        stopped.predict(batches(), progress=False)
    for probe in whole.probes:
        name = probe.name.replace(":", "_")
        want = StateStore.open(tmp_path / "whole" / name)
        have = StateStore.open(tmp_path / "stopped" / name)
        assert want.complete and not have.complete
        assert len(have) > 0 and np.array_equal(have.read(), want.read())
    stopped.predict(x[32:48], progress=False)  # a later whole run completes the stores again
    assert all(StateStore.open(tmp_path / "stopped" / p.name.replace(":", "_")).complete for p in whole.probes)


def test_without_storage_instance_counts_and_states_need_storage(demo_model, demo_data):
    probed = _build(demo_model)
    capture = probed.efficiency_layers[0]
    with pytest.raises(NoStatesError, match="recorded no states yet; run data"):
        capture.counts()
    probed.predict(demo_data[0][:20], progress=False)
    with pytest.raises(NoStatesError, match=r"counts\(index=\.\.\.\) needs the raw states.*pass a storage path"):
        capture.counts(index=[0])
    with pytest.raises(NoStatesError, match="states needs the raw states.*pass a storage path"):
        capture.states  # noqa: B018


def test_keep_states_without_storage_path(demo_model, demo_data):
    x = demo_data[0][:30]
    probed = _build(demo_model, keep_states=True)
    probed.predict(x, batch_size=8, progress=False)
    reference = _reference_tensors(demo_model, x, "all", _conv_tensors(demo_model)[1])
    capture = probed.efficiency_layers[1]
    tensor = reference[probed.probes[1].tensor_name]
    assert np.array_equal(capture.states[:], _reference_rows(tensor))
    assert _counts(capture, [2, 29]) == _reference_counts(tensor[[2, 29]])


def test_reset_states_zeroes_counts_and_starts_over(demo_model, demo_data, tmp_path):
    x = demo_data[0]
    probed = _build(demo_model, storage_path=tmp_path / "s")
    probed.predict(x[:100], progress=False)
    assert all(c.state_count > 0 for c in probed.efficiency_layers)
    probed.reset_states()
    assert [c.state_count for c in probed.efficiency_layers] == [0, 0, 0]
    with pytest.raises(NoStatesError, match="recorded no states"):
        probed.efficiency_layers[0].counts()
    probed.predict(x[100:150], progress=False)
    fresh = _build(demo_model)
    fresh.predict(x[100:150], progress=False)
    for a, b in zip(probed.efficiency_layers, fresh.efficiency_layers, strict=True):
        assert _counts(a) == _counts(b)
        assert a.states.shape[0] == b.state_count


def test_evaluate_accuracy_equals_plain_argmax(demo_model, demo_data):
    x, y = demo_data
    (logits,) = _run_plain(_plain_session(demo_model, "all"), x)
    expected = float(np.mean(logits.argmax(axis=1) == y))
    assert 0.9 < expected <= 1.0
    probed = _build(demo_model)
    assert probed.evaluate(x, y, batch_size=50, progress=False) == expected
    probed.reset_states()
    assert probed.evaluate((x, y), batch_size=50, progress=False) == expected
    probed.reset_states()
    one_hot = np.eye(10, dtype=np.float32)[y]
    assert probed.evaluate(x, one_hot, batch_size=50, progress=False) == expected


def test_labels_refused_by_evaluate_leave_nothing_recorded(demo_model, demo_data):
    """A bad label is refused before any batch runs, so evaluating again counts each sample once."""
    x, y = demo_data
    probed = _build(demo_model)
    bad = y.copy()
    bad[150] = 10
    with pytest.raises(ModelInputError, match=r"labels run from 0 to 10, but the model's first output scores 10 classes"):
        probed.evaluate(x, bad, batch_size=100, progress=False)
    with pytest.raises(ModelInputError, match="evaluate\\(\\) needs labels"):
        probed.evaluate(x, batch_size=100, progress=False)
    assert [c.state_count for c in probed.efficiency_layers] == [0] * len(probed.efficiency_layers)

    def pairs():
        yield x[:100], y[:100]
        yield x[100:200], np.full(100, 12)

    with pytest.raises(ModelInputError, match="labels run from 12 to 12"):
        probed.evaluate(pairs(), progress=False)
    first_batch = [c.state_count for c in probed.efficiency_layers]  # batches are checked as they come
    probed.reset_states()
    probed.predict(x[:100], progress=False)
    assert [c.state_count for c in probed.efficiency_layers] == first_batch


def test_nan_scores_count_as_wrong_predictions(demo_model, demo_data):
    x, y = demo_data
    nan_inputs = x.copy()
    nan_inputs[y == 0] = np.nan
    probed = _build(demo_model)
    clean = probed.evaluate(x, y, progress=False)
    with pytest.warns(RuntimeWarning, match="NaN among their class scores"):
        accuracy = probed.evaluate(nan_inputs, y, progress=False)
    correct_elsewhere = clean * len(y) - np.count_nonzero(y == 0)  # every digit 0 of the demo set is right
    assert accuracy == pytest.approx(correct_elsewhere / len(y))


def test_nan_and_infinite_inputs_follow_the_quantization_rule(demo_model):
    """NaN, 0, -0.0 and negatives do not fire; +inf and tiny positives do."""
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, -1.0, 1.0], dtype=np.float32)
    rng = np.random.default_rng(3)
    x = rng.choice(specials, size=(6, 1, 28, 28)).astype(np.float32)
    probed = _build(demo_model, method="both")
    out = probed.predict(x, progress=False)
    (expected_out,) = _run_plain(_plain_session(demo_model, "all"), x)
    np.testing.assert_array_equal(out, expected_out)  # NaN-aware
    seen = probed.efficiency_layers[0]  # conv1:before, the input itself
    fired = int(np.count_nonzero(np.isin(x, specials[[1, 5, 7]])))  # +inf, 1e-45, 1.0
    assert _counts(seen) == {b"\x01": fired, b"\x00": x.size - fired}
    inputs, outputs = _conv_tensors(demo_model)
    reference = _reference_tensors(demo_model, x, "all", inputs + outputs)
    assert any(np.isnan(reference[t]).any() for t in outputs)
    _assert_counts_match_reference(probed, reference)


def test_all_nan_input_gives_only_the_silent_state(demo_model):
    x = np.full((3, 1, 28, 28), np.nan, dtype=np.float32)
    probed = _build(demo_model)
    probed.predict(x, progress=False)
    conv1 = probed.efficiency_layers[0]
    assert _counts(conv1) == {bytes(3): 3 * 24 * 24}
    assert conv1.entropy() == 0.0 and conv1.efficiency() == 0.0


def test_model_file_is_not_changed_and_probes_are_described(demo_model):
    before = demo_model.SerializeToString()
    probed = _build(demo_model)
    assert demo_model.SerializeToString() == before
    assert probed.output_names == ["logits"]
    assert [i.name for i in probed.inputs] == ["input"]
    assert probed.providers == ["CPUExecutionProvider"]
    assert "conv1:after" in repr(probed)


# ---------------------------------------------------------------- bad input


@pytest.fixture
def broken_files(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not an ONNX model, just some words\n")
    truncated = tmp_path / "truncated.onnx"
    data = demo.model_path().read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    return {"missing": tmp_path / "nope.onnx", "directory": tmp_path, "text": text, "truncated": truncated}


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist; check the path"),
        ("directory", "is a directory, not an ONNX file"),
        ("text", "could not be parsed as an ONNX model"),
        ("truncated", "could not be parsed as an ONNX model"),
    ],
)
def test_unreadable_model_files_raise_model_file_error(broken_files, case, message):
    with pytest.raises(ModelFileError, match=message):
        OnnxEfficiencyModel(broken_files[case], "Conv", providers="cpu")
    with pytest.raises(ModelFileError, match=message):
        OnnxEfficiencyModel(str(broken_files[case]), "Conv", providers="cpu")


def test_attach_to_matching_nothing_lists_op_types(demo_model):
    with pytest.raises(ProbeMatchError, match=r"matched no op type.*Op types present: BatchNormalization, Conv, Elu, Flatten, Gemm, MaxPool"):
        _build(demo_model, attach_to="LSTM")


def test_unknown_exclude_name_warns_and_keeps_probes(demo_model):
    with pytest.warns(UserWarning, match="exclude entry 'no_such_layer' matched nothing"):
        probed = _build(demo_model, exclude=["no_such_layer"])
    assert [p.name for p in probed.probes] == ["conv1:after", "conv2:after", "conv3:after"]


def test_existing_storage_is_refused_and_left_untouched(demo_model, tmp_path):
    root = tmp_path / "taken"
    root.mkdir()
    (root / "keep.txt").write_text("precious")
    (root / "conv1_after").mkdir()
    (root / "conv1_after" / "data").write_bytes(b"\x00\x01")
    with pytest.raises(StorageExistsError, match="already exists and is not empty.*overwrite=True"):
        _build(demo_model, storage_path=root)
    assert sorted(p.name for p in root.rglob("*")) == ["conv1_after", "data", "keep.txt"]
    assert (root / "keep.txt").read_text() == "precious"
    assert (root / "conv1_after" / "data").read_bytes() == b"\x00\x01"


def test_storage_path_that_is_a_file_is_refused(demo_model, tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(StorageExistsError, match="already exists"):
        _build(demo_model, storage_path=path)
    assert path.read_text() == "x"


def test_empty_existing_storage_directory_is_used(demo_model, demo_data, tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    probed = _build(demo_model, storage_path=root)
    probed.predict(demo_data[0][:4], progress=False)
    assert probed.efficiency_layers[0].states.shape == (4 * 24 * 24, 3)


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(providers=None), ProviderError, "providers must be 'auto', 'cpu', 'cuda' or a non-empty list"),
        (dict(providers=3), ProviderError, "providers must be"),
        (dict(providers=[]), ProviderError, "non-empty list"),
        (dict(threads="a"), OptionError, r"threads must be a positive int .*got 'a'"),
        (dict(threads=2.5), OptionError, r"threads must be a positive int .*got 2.5"),
        (dict(threads=-1), OptionError, "got -1"),
        (dict(threads=True), OptionError, "got True"),
        (dict(channel_axes=[1]), OptionTypeError, "channel_axes must be a dict of probe name -> neuron axis, not list"),
        (dict(storage_path=5), OptionTypeError, r"storage_path must be a directory path \(str or os.PathLike\), not int"),
        (dict(keep_states="no"), OptionTypeError, "keep_states must be True or False, not 'no'"),
        (dict(pack_in_graph=None), OptionTypeError, "pack_in_graph must be True or False"),
        (dict(overwrite=1), OptionTypeError, "overwrite must be True or False, not 1"),
        (dict(mask_input=3), OptionTypeError, "mask_input must be the name of a model input, not int"),
    ],
)  # fmt: skip
def test_options_of_the_wrong_kind_are_refused_by_name(demo_model, options, error, message):
    with pytest.raises(error, match=message):
        OnnxEfficiencyModel(demo_model, "Conv", **options)


def test_unknown_provider(demo_model):
    with pytest.raises(ProviderError, match=r"unknown provider 'tpu'.*'auto', 'cpu', 'cuda'"):
        _build(demo_model, providers="tpu")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available")
def test_cuda_provider_when_unavailable(demo_model):
    with pytest.raises(ProviderError, match="CUDAExecutionProvider not available.*onnxruntime-gpu"):
        _build(demo_model, providers="cuda")


def test_unknown_optimization_level(demo_model):
    with pytest.raises(ValueError, match="unknown optimization level 'max'; use one of disable, basic, extended, all"):
        _build(demo_model, optimization="max")


def test_unknown_method(demo_model):
    with pytest.raises(ValueError, match="method must be one of before, after, both; got 'sideways'"):
        _build(demo_model, method="sideways")


def test_progress_bar_does_not_change_results(demo_model, demo_data, capsys):
    x = demo_data[0][:64]
    quiet, shown = _build(demo_model), _build(demo_model)
    out = quiet.predict(x, batch_size=16, progress=False)
    assert np.array_equal(shown.predict(x, batch_size=16, progress=True), out)
    assert [_counts(c) for c in shown.efficiency_layers] == [_counts(c) for c in quiet.efficiency_layers]
    assert "analyzing" in capsys.readouterr().err


def _classifier_with_class_ids(demo_model: onnx.ModelProto) -> onnx.ModelProto:
    """The demo model with an ArgMax after its scores: its only output is class ids ``[N]``."""
    model = onnx.ModelProto()
    model.CopyFrom(demo_model)
    scores = model.graph.output[0].name
    model.graph.node.append(helper.make_node("ArgMax", [scores], ["class_id"], axis=1, keepdims=0))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("class_id", onnx.TensorProto.INT64, ["batch"]))
    return model


def test_evaluate_takes_integer_outputs_as_class_ids(demo_model, demo_data):
    x, y = demo_data
    scores = OnnxEfficiencyModel(demo_model, "Conv", providers="cpu")
    ids = OnnxEfficiencyModel(_classifier_with_class_ids(demo_model), "Conv", providers="cpu")
    expected = scores.evaluate(x, y)
    assert expected > 0.95
    assert ids.evaluate(x, y) == expected
    with pytest.raises(ModelInputError, match="labels must be integer class ids"):
        scores.evaluate(x[:8], np.array(list("abcdefgh")))
