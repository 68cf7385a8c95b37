"""Tests of tensorstate_onnx.graph.editor: the rewritten model (typed outputs, untouched
original outputs, isolated fusible producers) and in-graph packing."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from tensorstate_onnx.graph import Probe, add_probes

RNG = np.random.default_rng(1234)
LEVELS = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
ALL_LEVELS = tuple(ort.GraphOptimizationLevel.__members__.values())


# ------------------------------------------------------------------- rewriting


def _cut(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` from its input ``x``, as outputs."""
    extractor = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(model))
    return extractor.extract_model(["x"], outputs)


def _by_tensor(probes: list[Probe]) -> dict[str, Probe]:
    return {p.tensor_name: p for p in probes}


def test_caller_model_unchanged_and_checker_passes(cnn):
    before = cnn.SerializeToString(deterministic=True)
    rewritten, _ = add_probes(cnn, "*", method="both")
    assert cnn.SerializeToString(deterministic=True) == before
    onnx.checker.check_model(rewritten, full_check=True)
    assert rewritten.opset_import == cnn.opset_import and rewritten.ir_version == cnn.ir_version
    assert [o.name for o in rewritten.graph.output[:2]] == ["logits", "branch"]
    assert rewritten.graph.output[:2] == cnn.graph.output[:2]


def test_existing_output_is_reused(cnn):
    """A probed tensor that is a graph output already is recorded from it; others
    leave the session quantized, as a new bool output ``<tensor>_fired``."""
    rewritten, probes = add_probes(cnn, ["fc", "bn"])
    assert [o.name for o in rewritten.graph.output] == ["logits", "branch", "n_fired"]
    assert {p.tensor_name: p.output_name for p in probes} == {"logits": "logits", "n": "n_fired"}


def test_fusible_producer_is_probed_through_a_duplicate(cnn, x, run):
    """Exposing a Conv output read by BatchNormalization/Add would stop onnxruntime
    fusing them (and change the original outputs' rounding): a duplicate Conv with
    its own weight copy computes the probe instead."""
    rewritten, probes = add_probes(cnn, "Conv")
    assert [(p.tensor_name, p.output_name) for p in probes] == [
        ("c", "c__probe_fired"), ("c2", "c2__probe_fired"),
    ]  # fmt: skip
    duplicates = [n for n in rewritten.graph.node if n.name.endswith("__probe")]
    assert [(n.op_type, list(n.input)) for n in duplicates] == [
        ("Conv", ["x", "W__probe", "B__probe"]), ("Conv", ["r", "W2__probe"]),
    ]  # fmt: skip
    cut = _cut(cnn, ["c", "c2"])
    for level in LEVELS:
        out = run(rewritten, {"x": x}, level)
        reference = run(cut, {"x": x}, LEVELS[1])
        assert np.array_equal(out["c__probe_fired"], reference["c"] > 0)
        assert np.array_equal(out["c2__probe_fired"], reference["c2"] > 0)


def test_a_duplicate_reading_only_shared_inputs_stays_a_float_output(make_cnn, x, run):
    """A duplicate with no private initializer (an Add of two activations) would be
    merged back into its original by onnxruntime's common-subexpression elimination
    if a node read it: it is exposed as it is, not quantized."""
    model = make_cnn(opset=17)
    model.graph.node.extend([
        helper.make_node("Add", ["r", "n"], ["sum2"], name="add2"),
        helper.make_node("LayerNormalization", ["sum2", "ln_scale"], ["ln"], name="ln", axis=-1),
    ])  # fmt: skip
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.ones(6, np.float32), "ln_scale"))
    model.graph.output.append(helper.make_tensor_value_info("ln", TensorProto.FLOAT, ["N", 6, 6, 6]))
    rewritten, probes = add_probes(model, ["add2"])
    (probe,) = probes
    assert probe.output_name == "sum2__probe"
    output = next(o for o in rewritten.graph.output if o.name == "sum2__probe")
    assert output.type.tensor_type.elem_type == TensorProto.FLOAT
    reference, out = run(model, {"x": x}), run(rewritten, {"x": x})
    assert all(np.array_equal(reference[k], out[k]) for k in reference)
    unfused = run(rewritten, {"x": x}, LEVELS[1])["sum2__probe"]
    assert np.array_equal(unfused, run(_cut(model, ["sum2"]), {"x": x}, LEVELS[1])["sum2"])
    packed, (probe,) = add_probes(model, ["add2"], pack_in_graph=True)  # packing ops read it: pinned too
    assert "sum2__probe" in [o.name for o in packed.graph.output] and probe.output_name != "sum2__probe"


def test_probe_outputs_are_typed(cnn):
    rewritten, probes = add_probes(cnn, ["tr", "flat"])
    outputs = {o.name: o for o in rewritten.graph.output}
    for probe in probes:
        tensor_type = outputs[probe.output_name].type.tensor_type
        assert tensor_type.elem_type == TensorProto.BOOL  # float probes leave quantized
        dims = tensor_type.shape.dim
        assert [d.dim_value if d.HasField("dim_value") else None for d in dims] == list(probe.shape)
        assert dims[0].dim_param == "N"
    assert _by_tensor(probes)["t"].shape == (None, 6, 6, 6)
    assert _by_tensor(probes)["f"].shape == (None, 54)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("level", ALL_LEVELS)
def test_original_outputs_bit_identical(cnn, x, level, pack, run):
    rewritten, probes = add_probes(cnn, "*", method="both", pack_in_graph=pack)
    assert len(probes) == 22 and len({p.tensor_name for p in probes}) == 12
    reference = run(cnn, {"x": x}, level)
    probed = run(rewritten, {"x": x}, level)
    for name, value in reference.items():
        assert np.array_equal(value, probed[name])


@pytest.mark.parametrize("level", LEVELS)
def test_probed_values_are_the_intermediates(cnn, x, run, level):
    """Each probe output is ``tensor > 0`` of the tensor it names, against the graph
    cut right at those tensors (run unfused, so the values are exact)."""
    patterns = ["conv", "bn", "Relu", "conv2", "add", "pool", "flat", "tr"]
    rewritten, probes = add_probes(cnn, patterns, method="both")
    out = run(rewritten, {"x": x}, level)
    got = {p.tensor_name: out[p.output_name] for p in probes}
    assert set(got) == {"x", "c", "n", "r", "c2", "skip", "p", "f", "t"}
    reference = run(_cut(cnn, sorted(set(got) - {"x"})), {"x": x}, LEVELS[1])
    reference["x"] = x
    for tensor, fired in got.items():
        assert fired.dtype == np.bool_
        assert np.array_equal(fired, reference[tensor] > 0), tensor


def test_old_ir_version(x, run, make_cnn):
    """IR 3 models declare every initializer as a graph input, copies included."""
    model = make_cnn(opset=9)
    model.ir_version = 3
    for init in model.graph.initializer:
        declared = helper.make_tensor_value_info(init.name, init.data_type, init.dims)
        model.graph.input.append(declared)
    onnx.checker.check_model(model)
    rewritten, probes = add_probes(model, "Conv")
    assert [p.output_name for p in probes] == ["c__probe_fired", "c2__probe_fired"]
    assert {"W__probe", "B__probe", "W2__probe"} <= {i.name for i in rewritten.graph.input}
    reference, out = run(model, {"x": x}), run(rewritten, {"x": x})
    assert all(np.array_equal(reference[k], out[k]) for k in reference)


# ------------------------------------------------------------ in-graph packing


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


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("channels", [12, 8, 3, 17])
def test_pack_matches_numpy(channels, level, run, packbits):
    model = _identity_model(["N", channels, 3, 5])
    # An input read by an Identity only: no rule gives its layout; say it is NCHW.
    rewritten, probes = add_probes(model, "id", pack_in_graph=True, channel_axes={"id": 1})
    (probe,) = probes
    assert probe.packed_in_graph and probe.channel_axis == 1 and probe.n_neurons == channels
    assert probe.output_name != "y" and probe.tensor_name == "y"
    x = _special_values((4, channels, 3, 5))
    out = run(rewritten, {"x": x}, level)
    packed = out[probe.output_name]
    assert packed.dtype == np.uint8 and packed.shape == (4 * 3 * 5, -(-channels // 8))
    assert np.array_equal(packed, packbits(x, 1))
    assert np.array_equal(out["y"], x, equal_nan=True)


def test_pack_fire_rule_on_special_values(run):
    model = _identity_model(["N", 8])
    rewritten, probes = add_probes(model, "id", pack_in_graph=True)
    x = np.array([[np.nan, -0.0, 0.0, np.inf, -np.inf, -1.0, 1e-30, 3.0]], dtype=np.float32)
    packed = run(rewritten, {"x": x})[probes[0].output_name]
    assert packed.tolist() == [[0b11001000]]


@settings(max_examples=25, deadline=None)
@given(
    channels=st.integers(1, 40),
    spatial=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    axis_pick=st.integers(0, 3),
    dtype=st.sampled_from([np.float32, np.float64, np.float16]),
)
def test_pack_property(channels, spatial, axis_pick, dtype, run, packbits):
    shape = [2, *spatial]
    axis = axis_pick % (len(shape) + 1)
    shape.insert(axis, channels)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    model = _identity_model(shape, elem)
    rewritten, probes = add_probes(model, "id", pack_in_graph=True, channel_axes={"id:after": axis})
    x = _special_values(tuple(shape), dtype)
    packed = run(rewritten, {"x": x})[probes[0].output_name]
    assert np.array_equal(packed, packbits(x, axis))


def test_pack_rank_one_is_one_neuron_per_sample(run):
    model = _identity_model(["N"])
    rewritten, (probe,) = add_probes(model, "id", pack_in_graph=True)
    assert (probe.channel_axis, probe.n_neurons, probe.axis_guessed) == (1, 1, False)
    x = np.array([1.0, -2.0, 0.0, 3.5, np.nan], np.float32)
    packed = run(rewritten, {"x": x})[probe.output_name]
    assert packed.tolist() == [[1], [0], [0], [1], [0]]


def test_pack_cnn_probes_match_numpy(cnn, x, run, packbits):
    plain, plain_probes = add_probes(cnn, "*", method="both")
    packed, packed_probes = add_probes(cnn, "*", method="both", pack_in_graph=True)
    plain_out, packed_out = run(plain, {"x": x}), run(packed, {"x": x})
    for a, b in zip(plain_probes, packed_probes):
        assert (a.name, a.channel_axis) == (b.name, b.channel_axis)
        expected = packbits(plain_out[a.output_name], a.channel_axis)
        assert np.array_equal(packed_out[b.output_name], expected), a.name


def test_pack_needs_opset_13():
    with pytest.raises(ValueError, match="opset"):
        add_probes(_identity_model(["N", 8], opset=12), "id", pack_in_graph=True)
    _, probes = add_probes(_identity_model(["N", 8], opset=12), "id")
    assert probes[0].output_name == "y"


def test_pack_needs_static_channels():
    with pytest.raises(ValueError, match="neurons"):
        add_probes(_identity_model(["N", "C"]), "id", pack_in_graph=True)
