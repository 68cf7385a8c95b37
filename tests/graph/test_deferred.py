"""Tests of tensorstate_onnx.graph.deferred: a model file's graph read, its weights left in the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from tensorstate_onnx import OnnxEfficiencyModel
from tensorstate_onnx.errors import ModelFileError
from tensorstate_onnx.graph import load_model, load_model_deferred, save_model, with_weights
from tensorstate_onnx.graph.deferred import DEFER_MIN_BYTES

CORPUS = Path(onnx.__file__).parent / "backend" / "test" / "data"


def _mlp() -> onnx.ModelProto:
    """x[N, 64] -> MatMul(64x256) -> Add -> Relu -> Reshape(by an int64 initializer) -> MatMul(256x40) -> Relu.

    The weights straddle the threshold: 64x256 and 256x40 floats (64 KiB, 40 KiB)
    are left in the file, the 256 and 40 biases and the shape stay in memory, and
    a 1,536-element float16 table (3 KiB) stays too, though it is large for the
    checker's skeleton.
    """
    rng = np.random.default_rng(7)
    inits = [
        numpy_helper.from_array(rng.standard_normal((64, 256)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal(256).astype(np.float32), "b1"),
        numpy_helper.from_array(np.array([-1, 256], dtype=np.int64), "shape"),
        numpy_helper.from_array(rng.standard_normal((256, 40)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal(1536).astype(np.float16), "unused_table"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
        helper.make_node("Relu", ["hb"], ["r1"], name="act1"),
        helper.make_node("Reshape", ["r1", "shape"], ["flat"], name="reshape"),
        helper.make_node("MatMul", ["flat", "W2"], ["h2"], name="fc2"),
        helper.make_node("Relu", ["h2"], ["y"], name="act2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 40])],
        inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def mlp_file(tmp_path) -> Path:
    return save_model(_mlp(), tmp_path / "mlp.onnx", external_data=False)


def _locations(model: onnx.ModelProto) -> dict[str, dict[str, str]]:
    return {
        t.name: {e.key: e.value for e in t.external_data}
        for t in model.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
    }


def test_large_weights_stay_in_the_file_as_references_into_it(mlp_file):
    deferred = load_model_deferred(mlp_file)
    refs = _locations(deferred)
    assert sorted(refs) == ["W1", "W2"]
    data = mlp_file.read_bytes()
    full = onnx.load(str(mlp_file))
    for tensor in full.graph.initializer:
        if tensor.name in refs:
            ref = refs[tensor.name]
            assert ref["location"] == "mlp.onnx"
            start, length = int(ref["offset"]), int(ref["length"])
            assert data[start:start + length] == tensor.raw_data  # the very bytes, in place
            assert length > DEFER_MIN_BYTES
    kept = {t.name: t for t in deferred.graph.initializer if t.name not in refs}
    assert sorted(kept) == ["b1", "shape", "unused_table"]
    assert numpy_helper.to_array(kept["shape"]).tolist() == [-1, 256]
    assert deferred.ByteSize() < 8_000 < len(data)


def test_with_weights_gives_back_the_file_byte_for_byte(mlp_file):
    deferred = load_model_deferred(mlp_file)
    restored = with_weights(deferred, mlp_file.parent)
    assert restored.SerializeToString() == mlp_file.read_bytes()
    assert _locations(deferred)  # the deferred model itself is unchanged


def test_every_corpus_file_reads_back_exactly(monkeypatch):
    """The onnx package's backend models (real exports, their weights cut small):
    with every tensor over 16 bytes deferred, reading the weights back gives each
    file's bytes."""
    monkeypatch.setattr("tensorstate_onnx.graph.deferred.DEFER_MIN_BYTES", 16)
    paths = sorted(CORPUS.glob("light/*.onnx")) + sorted(CORPUS.glob("pytorch-*/*/model.onnx"))
    assert len(paths) > 50
    deferred_somewhere = 0
    for path in paths:
        deferred = load_model_deferred(path)
        deferred_somewhere += bool(_locations(deferred))
        assert with_weights(deferred, path.parent).SerializeToString() == path.read_bytes(), path
    assert deferred_somewhere >= 20


def test_a_model_with_external_data_keeps_its_files(tmp_path):
    model = _mlp()
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="w.bin", size_threshold=0)
    deferred = load_model_deferred(tmp_path / "ext.onnx")
    assert {ref["location"] for ref in _locations(deferred).values()} == {"w.bin"}
    restored = with_weights(deferred, tmp_path)
    want = load_model(tmp_path / "ext.onnx")
    assert [numpy_helper.to_array(t).tobytes() for t in restored.graph.initializer] == [
        numpy_helper.to_array(t).tobytes() for t in want.graph.initializer
    ]


def test_a_symbolic_link_is_read_whole(mlp_file, tmp_path):
    link = tmp_path / "link.onnx"
    link.symlink_to(mlp_file)
    deferred = load_model_deferred(link)
    assert not _locations(deferred)
    assert deferred.SerializeToString() == mlp_file.read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "wrong_size", "directory", "missing"])
def test_damaged_files_raise_what_load_model_raises(mlp_file, tmp_path, damage):
    path = tmp_path / f"{damage}.onnx"
    data = mlp_file.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) - 5000])
    elif damage == "garbage":
        path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8)))
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "wrong_size":  # W1's raw_data a row short of its shape
        model = _mlp()
        model.graph.initializer[0].raw_data = model.graph.initializer[0].raw_data[: -256 * 4]
        path.write_bytes(model.SerializeToString())
    elif damage == "directory":
        path.mkdir()
    with pytest.raises(ModelFileError) as deferred_error:
        load_model_deferred(path)
    with pytest.raises(ModelFileError) as whole_error:
        load_model(path)
    assert str(deferred_error.value) == str(whole_error.value)


def test_a_session_from_a_file_reads_its_weights_from_it(mlp_file):
    x = np.random.default_rng(3).standard_normal((32, 64)).astype(np.float32)
    from_file = OnnxEfficiencyModel(mlp_file, "Relu", providers="cpu")
    from_proto = OnnxEfficiencyModel(_mlp(), "Relu", providers="cpu")
    assert _locations(from_file._probed) and not _locations(from_proto._probed)
    (got,), (want,) = from_file.run({"x": x}), from_proto.run({"x": x})
    assert np.array_equal(got, want)
    for a, b in zip(from_file.efficiency_layers, from_proto.efficiency_layers, strict=True):
        assert sorted(a.counts().tolist()) == sorted(b.counts().tolist())
    assert from_file.model.SerializeToString() == from_proto.model.SerializeToString()


def test_the_model_of_a_moved_file_is_a_clear_error(mlp_file):
    probed = OnnxEfficiencyModel(mlp_file, "Relu", providers="cpu")
    os.replace(mlp_file, mlp_file.with_suffix(".moved"))
    x = np.ones((2, 64), np.float32)
    assert probed.run({"x": x})[0].shape == (2, 40)  # the session holds its own weights
    with pytest.raises(ModelFileError, match="moved or deleted"):
        probed.model


def test_an_onnxruntime_without_the_folder_option_gets_the_weights(mlp_file, monkeypatch):
    monkeypatch.setattr(ort, "__version__", "1.20.1")
    probed = OnnxEfficiencyModel(mlp_file, "Relu", providers="cpu")
    assert not _locations(probed._probed)
    assert probed.run({"x": np.ones((2, 64), np.float32)})[0].shape == (2, 40)
