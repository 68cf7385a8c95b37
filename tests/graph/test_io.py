"""Tests of tensorstate_onnx.graph.io: reading and writing models, external data, validation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

from tensorstate_onnx.errors import ModelFileError
from tensorstate_onnx.graph import add_probes, load_model, save_model
from tensorstate_onnx.graph import io as graph_io

RNG = np.random.default_rng(1234)


# -------------------------------------------------------------- files and size


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


def test_large_model_goes_through_external_data(cnn, x, tmp_path, monkeypatch, run):
    monkeypatch.setattr(graph_io, "EXTERNAL_DATA_THRESHOLD", 1000)

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
    reference, probed = run(cnn, {"x": x}), run(str(target), {"x": x})
    for name, value in reference.items():
        assert np.array_equal(value, probed[name])
    exposed = onnx.ModelProto()
    exposed.CopyFrom(cnn)
    exposed.graph.output.append(onnx.helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, None))
    assert np.array_equal(probed[probes[0].output_name], run(exposed, {"x": x})["r"] > 0)


@pytest.fixture
def weighty(initializer):
    """x[N, 64] @ w[64, 64] -> Reshape to [N, 8, 8] (target an int64 initializer) -> Relu:
    one weight over the skeleton's size limit, and a small constant that data
    propagation must read."""
    from onnx import TensorProto, helper

    target = onnx.numpy_helper.from_array(np.array([-1, 8, 8], np.int64), "target")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Reshape", ["h", "target"], ["r"], name="reshape"),
        helper.make_node("Relu", ["r"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "weighty", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8])],
        [initializer("w", 64, 64), target],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_checks_and_shape_inference_never_see_the_weights(weighty, monkeypatch):
    """The checker and shape inference get the weightless skeleton: ``w`` (4,096
    elements) is a graph input there, the Reshape target stays, types are complete."""
    seen = []
    real_check, real_infer = onnx.checker.check_model, onnx.shape_inference.infer_shapes

    def record(real):
        def wrapped(model, *args, **kwargs):
            seen.append({t.name for t in model.graph.initializer})
            return real(model, *args, **kwargs)

        return wrapped

    monkeypatch.setattr(onnx.checker, "check_model", record(real_check))
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", record(real_infer))
    rewritten, probes = add_probes(weighty, ["mm", "Reshape"])
    # the weight "w" never; the small Reshape target (and the zeros probes compare with) always
    assert len(seen) >= 3 and all("w" not in names and "target" in names for names in seen)
    assert [(p.name, p.shape) for p in probes] == [("mm:after", (None, 64)), ("reshape:after", (None, 8, 8))]
    assert [t.name for t in rewritten.graph.initializer] == ["w", "target", "h_zero", "r_zero"]
    light = graph_io.skeleton(weighty)
    assert [i.name for i in light.graph.input] == ["x", "w"] and weighty.graph.initializer[0].HasField("raw_data")


def test_a_weight_whose_data_does_not_fit_its_shape_is_refused(weighty, tmp_path):
    weighty.graph.initializer[0].raw_data = weighty.graph.initializer[0].raw_data[:-4]
    with pytest.raises(ModelFileError, match=r"'w'.*16380 bytes.*\[64, 64\].*16384"):
        add_probes(weighty, "mm")
    onnx.save_model(weighty, str(tmp_path / "short.onnx"))
    with pytest.raises(ModelFileError, match="not a valid ONNX model"):
        load_model(tmp_path / "short.onnx")


def test_split_weights_builds_the_same_session_without_serializing_them(weighty):
    """The skeleton refers to ``w`` in the in-memory file, the small Reshape target
    stays inline, the model is unchanged, and onnxruntime computes the same outputs."""
    import onnxruntime as ort

    before = weighty.SerializeToString(deterministic=True)
    light, files = graph_io.split_weights(weighty)
    assert weighty.SerializeToString(deterministic=True) == before
    w, target = light.graph.initializer
    assert w.data_location == onnx.TensorProto.EXTERNAL and not w.HasField("raw_data")
    (name, data), = files.items()
    assert {e.key: e.value for e in w.external_data} == {"location": name, "offset": "0", "length": str(64 * 64 * 4)}
    assert data == weighty.graph.initializer[0].raw_data and target.HasField("raw_data")
    options = ort.SessionOptions()
    options.add_external_initializers_from_files_in_memory([name], [data], [len(data)])
    x = RNG.standard_normal((3, 64)).astype(np.float32)
    split = ort.InferenceSession(light.SerializeToString(), options, providers=["CPUExecutionProvider"])
    whole = ort.InferenceSession(before, providers=["CPUExecutionProvider"])
    np.testing.assert_array_equal(split.run(None, {"x": x})[0], whole.run(None, {"x": x})[0])


def _with_data_at(cnn: onnx.ModelProto, folder: Path, location: str) -> Path:
    """``cnn`` saved in ``folder`` with its weights in ``weights.bin``, then said to be at ``location``."""
    path = folder / "model.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(cnn)  # saving with external data changes the proto it saves
    onnx.save_model(copy, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(model.SerializeToString())
    return path


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _assert_same_weights(a: onnx.ModelProto, b: onnx.ModelProto) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and wa
    for name in wa:
        np.testing.assert_array_equal(wa[name], wb[name])


def test_external_data_beside_the_model_or_below_it_loads(cnn, tmp_path):
    path = _with_data_at(cnn, tmp_path, "weights.bin")
    _assert_same_weights(load_model(path), cnn)
    (tmp_path / "data").mkdir()
    (tmp_path / "weights.bin").rename(tmp_path / "data" / "weights.bin")
    path = _with_data_at(cnn, tmp_path, "data/weights.bin")
    (tmp_path / "weights.bin").unlink()
    _assert_same_weights(load_model(path), cnn)
    (tmp_path / "link.bin").symlink_to(tmp_path / "data" / "weights.bin")  # inside, but onnx refuses links
    with pytest.raises(ModelFileError, match="a symbolic link; onnx reads external data only from regular files"):
        load_model(_with_data_at(cnn, tmp_path, "link.bin"))


@pytest.mark.parametrize("escape", ["relative", "absolute", "symlink", "device"])
def test_external_data_outside_the_model_folder_is_refused(cnn, tmp_path, escape):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"\0" * 4096)
    folder = tmp_path / "model"
    folder.mkdir()
    location = {"relative": "../secret.bin", "absolute": str(outside), "symlink": "link.bin", "device": "dev.bin"}
    if escape == "symlink":
        (folder / "link.bin").symlink_to(outside)
    if escape == "device":
        (folder / "dev.bin").symlink_to("/dev/zero")
    path = _with_data_at(cnn, folder, location[escape])
    with pytest.raises(ModelFileError, match="outside the model's folder"):
        load_model(path)


def test_external_data_that_is_not_a_file_is_refused(cnn, tmp_path):
    os.mkfifo(tmp_path / "pipe.bin")
    (tmp_path / "folder.bin").mkdir()
    for location in ("pipe.bin", "folder.bin"):
        with pytest.raises(ModelFileError, match="not a regular file"):
            load_model(_with_data_at(cnn, tmp_path, location))


def test_needs_external_data_counts_the_weights_from_their_shapes(weighty, monkeypatch):
    """The weights' bytes are counted from their shapes and types (asking protobuf
    for a whole model's size serializes it): the decision matches the real size."""
    size = weighty.ByteSize()
    for threshold, expected in ((size - 2000, True), (size + 2000, False)):
        monkeypatch.setattr(graph_io, "EXTERNAL_DATA_THRESHOLD", threshold)
        assert graph_io.needs_external_data(weighty) is expected, threshold
    monkeypatch.setattr(graph_io, "EXTERNAL_DATA_THRESHOLD", 10_000)  # the weight alone is 16,384 bytes
    assert graph_io.needs_external_data(weighty)
