"""Tests of the data front door: every accepted form of data gives the same counts,
and every malformed one a clear error (``tensorstate_onnx.data`` through
``OnnxEfficiencyModel``)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zarr
from onnx import TensorProto, helper

from tensorstate_onnx import OnnxEfficiencyModel, demo
from tensorstate_onnx.data import CACHED_BATCH_BYTES, DEFAULT_BATCH_SIZE, cache_sized_batch, iter_batches
from tensorstate_onnx.errors import ModelInputError

N_SAMPLES = 120


def _counts(capture) -> dict[bytes, int]:
    return dict(zip(capture.state_ids(), capture.counts().tolist(), strict=True))


def _reference_counts(tensor: np.ndarray) -> dict[bytes, int]:
    c = tensor.shape[1]
    rows = np.packbits(np.moveaxis(tensor, 1, -1).reshape(-1, c) > 0, axis=-1, bitorder="little")
    ids, counts = np.unique(rows, axis=0, return_counts=True)
    return {row.tobytes(): int(n) for row, n in zip(ids, counts, strict=True)}


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    x, y = demo.load_test_data()
    return x[:N_SAMPLES], y[:N_SAMPLES]


@pytest.fixture(scope="module")
def expected(demo_model, data):
    """Per-probe counts and accuracy from plain onnxruntime + numpy."""
    x, y = data
    copy = onnx.ModelProto()
    copy.CopyFrom(demo_model)
    convs = [node.output[0] for node in copy.graph.node if node.op_type == "Conv"]
    for name in convs:
        copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, *tensors = session.run(None, {"input": x})
    return [_reference_counts(t) for t in tensors], float(np.mean(logits.argmax(1) == y))


@pytest.fixture
def build(demo_model):
    return lambda **options: OnnxEfficiencyModel(demo_model, "Conv", providers="cpu", **options)


def _torch_loader(x, y, batch_size=32):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=batch_size, shuffle=False)


def _tf_dataset(x, y, batch_size=32):
    tf = pytest.importorskip("tensorflow")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)


def _zarr_array(x):
    array = zarr.create_array(zarr.storage.MemoryStore(), shape=x.shape, chunks=(25, *x.shape[1:]), dtype=x.dtype)
    array[:] = x
    return array


# Each form: data built from (x, y) -> (data, labels or None, whether labels ride along).
PREDICT_FORMS = {
    "array": lambda x, y: x,
    "float64 array": lambda x, y: x.astype(np.float64),
    "dict": lambda x, y: {"input": x},
    "(x, y) tuple": lambda x, y: (x, y),
    "list of batches": lambda x, y: [x[i : i + 50] for i in range(0, len(x), 50)],
    "list of two equal batches": lambda x, y: [x[:60], x[60:]],
    "generator of (x, y)": lambda x, y: ((x[i : i + 40], y[i : i + 40]) for i in range(0, len(x), 40)),
    "generator of batches": lambda x, y: (x[i : i + 33] for i in range(0, len(x), 33)),
    "generator of dicts": lambda x, y: ({"input": x[i : i + 33]} for i in range(0, len(x), 33)),
    "zarr array": lambda x, y: _zarr_array(x),
    "memory map": None,  # built in the test (needs tmp_path)
}
EVALUATE_FORMS = {
    "(x, y) tuple": lambda x, y: ((x, y), None),
    "array + labels": lambda x, y: (x, y),
    "dict + labels": lambda x, y: ({"input": x}, y),
    "(dict, y) tuple": lambda x, y: (({"input": x}, y), None),
    "generator of (x, y)": lambda x, y: (((x[i : i + 40], y[i : i + 40]) for i in range(0, len(x), 40)), None),
    "generator + labels": lambda x, y: ((x[i : i + 40] for i in range(0, len(x), 40)), y),
    "torch DataLoader": lambda x, y: (_torch_loader(x, y), None),
    "tf.data Dataset": lambda x, y: (_tf_dataset(x, y), None),
    "zarr array + zarr labels": lambda x, y: (_zarr_array(x), _zarr_array(y)),
}


@pytest.mark.parametrize("form", list(PREDICT_FORMS))
def test_predict_forms_give_the_reference_counts(build, data, expected, form, tmp_path):
    x, y = data
    if form == "memory map":
        np.save(tmp_path / "x.npy", x)
        source = np.load(tmp_path / "x.npy", mmap_mode="r")
    else:
        source = PREDICT_FORMS[form](x, y)
    model = build()
    out = model.predict(source, batch_size=48, progress=False)
    assert out.shape == (len(x), 10)
    assert [_counts(c) for c in model.efficiency_layers] == expected[0]


@pytest.mark.parametrize("form", list(EVALUATE_FORMS))
def test_evaluate_forms_give_the_reference_counts_and_accuracy(build, data, expected, form):
    x, y = data
    source, labels = EVALUATE_FORMS[form](x, y)
    model = build()
    accuracy = model.evaluate(source, labels, batch_size=48, progress=False)
    assert accuracy == expected[1]
    assert [_counts(c) for c in model.efficiency_layers] == expected[0]


# ---------------------------------------------------------------- iter_batches


def test_iter_batches_slices_arrays_and_labels(data):
    x, y = data
    batches = list(iter_batches((x, y), batch_size=50))
    assert [len(b.inputs) for b in batches] == [50, 50, 20]
    assert np.array_equal(np.concatenate([b.labels for b in batches]), y)
    assert np.array_equal(np.concatenate([b.inputs for b in batches]), x)
    dict_batches = list(iter_batches({"input": x}, y, batch_size=100))
    assert [b.inputs["input"].shape[0] for b in dict_batches] == [100, 20]
    assert np.array_equal(dict_batches[1].labels, y[100:])


def test_iter_batches_keeps_stream_batches_as_they_come(data):
    x, y = data
    sizes = [len(b.inputs) for b in iter_batches(x[i : i + 7] for i in range(0, len(x), 7))]
    assert sizes == [7] * 17 + [1]
    default = list(iter_batches(np.zeros((600, 2), np.float32)))
    assert [len(b.inputs) for b in default] == [256, 256, 88]


def test_iter_batches_rejects_labels_given_twice(data):
    x, y = data
    with pytest.raises(ModelInputError, match=r"labels were given twice: inside \(x, y\) data and as labels="):
        list(iter_batches((x, y), y))
    with pytest.raises(ModelInputError, match="labels were given twice: inside the batches and as labels="):
        list(iter_batches(iter([(x, y)]), y))


def test_sample_weight_triples_are_refused_not_read_as_three_batches(data):
    x, y = data
    w = np.ones(len(y), np.float32)
    for source in ((x, y, w), iter([(x[:7], y[:7], w[:7])]), [(x[:7], y[:7], w[:7])]):
        with pytest.raises(ModelInputError, match=r"\(x, y, sample_weight\) batches are not supported.*pass \(x, y\) pairs"):
            list(iter_batches(source))
    with pytest.raises(ModelInputError, match="a batch given as a tuple of 1 items is ambiguous"):
        list(iter_batches((x,)))


# ---------------------------------------------------------------- bad data


def test_wrong_input_name(build, data):
    with pytest.raises(ModelInputError, match=r"expected \['input'\], got \['pixels'\] \(unknown: \['pixels'\]\) \(missing: \['input'\]\)"):
        build().predict({"pixels": data[0]}, progress=False)


def test_wrong_rank(build, data):
    with pytest.raises(ModelInputError, match=r"input 'input' expects shape \(N, 1, 28, 28\), got \(120, 28, 28\)"):
        build().predict(data[0][:, 0], batch_size=200, progress=False)


def test_wrong_shape(build):
    with pytest.raises(ModelInputError, match=r"expects shape \(N, 1, 28, 28\), got \(4, 1, 32, 32\)"):
        build().predict(np.zeros((4, 1, 32, 32), np.float32), progress=False)


def test_integer_data_for_a_float_model(build, data):
    with pytest.raises(ModelInputError, match="input 'input' expects float32 data, got int64; convert it"):
        build().predict((data[0] * 255).astype(np.int64), progress=False)


@pytest.mark.parametrize(
    "empty",
    [
        lambda x: x[:0],
        lambda x: [],
        lambda x: (batch for batch in []),
        lambda x: {"input": x[:0]},
    ],
    ids=["0 samples", "empty list", "empty generator", "dict of 0 samples"],
)
def test_empty_data(build, data, empty):
    with pytest.raises(ModelInputError, match="the data holds no samples"):
        build().predict(empty(data[0]), progress=False)


def test_empty_batch_inside_a_stream(build, data):
    x = data[0]
    with pytest.raises(ModelInputError, match=r"input 'input' got an empty batch \(shape \(0, 1, 28, 28\)\)"):
        build().predict(iter([x[:10], x[:0]]), progress=False)


def test_labels_of_a_different_length_array(build, data):
    x, y = data
    with pytest.raises(ModelInputError, match="got 119 labels for 120 samples; give one label per sample"):
        build().evaluate(x, y[:-1], progress=False)
    with pytest.raises(ModelInputError, match="got 121 labels for 120 samples"):
        build().evaluate((x, np.append(y, 0)), progress=False)


def test_labels_of_a_different_length_stream(build, data):
    x, y = data
    batches = lambda: (x[i : i + 50] for i in range(0, len(x), 50))  # noqa: E731
    with pytest.raises(ModelInputError, match="labels ran out after 100 samples; give one label per sample"):
        build().evaluate(batches(), y[:-1], progress=False)
    with pytest.raises(ModelInputError, match="got 123 labels for 120 samples"):
        build().evaluate(batches(), np.append(y, [0, 1, 2]), progress=False)
    pairs = ((x[i : i + 50], y[i : i + 49]) for i in range(0, len(x), 50))
    with pytest.raises(ModelInputError, match="got 49 labels for 50 samples"):
        build().evaluate(pairs, progress=False)


def test_ragged_labels_and_inputs_are_refused_naming_which(build, data):
    x, _ = data
    ragged = [[1, 2]] + [[0]] * (len(x) - 1)
    with pytest.raises(ModelInputError, match=r"^labels given as a list that is not one array"):
        build().evaluate(x, ragged, progress=False)
    with pytest.raises(ModelInputError, match=r"^labels given as a list that is not one array"):
        build().evaluate(iter([x]), ragged, progress=False)
    with pytest.raises(ModelInputError, match=r"^data given as a list that is not one array"):
        build().predict(iter([{"input": [[0.0, 1.0], [2.0]]}]), progress=False)


def test_evaluate_without_labels(build, data):
    with pytest.raises(ModelInputError, match=r"evaluate\(\) needs labels: pass labels=\.\.\. or \(x, y\) batches"):
        build().evaluate(data[0], progress=False)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True, "32"])
def test_bad_batch_size(build, data, batch_size):
    with pytest.raises(ValueError, match=rf"batch_size must be a positive int, got {batch_size!r}"):
        build().predict(data[0], batch_size=batch_size, progress=False)


@pytest.mark.parametrize("value", ["images.npy", 3.0, None])
def test_data_that_is_not_batches(build, value):
    with pytest.raises(TypeError, match=f"cannot read batches from {type(value).__name__}; pass a numpy array"):
        build().predict(value, progress=False)


def test_scalar_batches(build):
    with pytest.raises(ModelInputError, match="data must have a batch axis; got a scalar"):
        build().predict(iter([np.float32(1.0)]), progress=False)


# ---------------------------------------------------------------- several inputs


@pytest.fixture(scope="module")
def two_inputs() -> onnx.ModelProto:
    """``relu(a + b)`` and ``a - b`` of two ``[N, 4]`` inputs."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["a", "b"], ["s"], name="add"),
            helper.make_node("Relu", ["s"], ["r"], name="relu"),
            helper.make_node("Sub", ["a", "b"], ["d"], name="sub"),
        ],
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("a", "b")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 4]) for n in ("r", "d")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_two_input_model_takes_dicts(two_inputs):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 30, 4)).astype(np.float32)
    y = rng.integers(0, 4, 30)
    model = OnnxEfficiencyModel(two_inputs, "Add", providers="cpu")
    relu, diff = model.predict({"a": a, "b": b}, batch_size=8, progress=False)
    assert np.array_equal(relu, np.maximum(a + b, 0)) and np.array_equal(diff, a - b)
    rows = np.packbits(a + b > 0, axis=-1, bitorder="little")
    ids, counts = np.unique(rows, axis=0, return_counts=True)
    assert _counts(model.efficiency_layers[0]) == {r.tobytes(): int(n) for r, n in zip(ids, counts, strict=True)}
    model.reset_states()
    accuracy = model.evaluate(((({"a": a[i : i + 7], "b": b[i : i + 7]}, y[i : i + 7]) for i in range(0, 30, 7))), progress=False)
    assert accuracy == float(np.mean(relu.argmax(1) == y))
    assert model.efficiency_layers[0].state_count == 30
    with pytest.raises(ModelInputError, match=r"the model has 2 inputs \(a, b\); pass a dict"):
        model.predict(a, progress=False)
    with pytest.raises(ModelInputError, match=r"\(missing: \['b'\]\)"):
        model.predict({"a": a}, progress=False)
    with pytest.raises(ModelInputError, match=r"inputs have different numbers of samples: \{'a': 30, 'b': 29\}"):
        model.predict({"a": a, "b": b[:29]}, progress=False)
    with pytest.raises(ModelInputError, match="a batch given as a tuple of 2 items is ambiguous"):
        model.predict(iter([(a, b)]), progress=False)


def test_cache_sized_batch_halves_until_a_batch_of_probe_outputs_fits():
    """256 samples unless their probe outputs pass the cache budget; then the
    largest power of two that fits (at least 1); unknown sizes keep 256."""
    assert DEFAULT_BATCH_SIZE == 256
    assert cache_sized_batch(None) == cache_sized_batch(0) == 256
    per_full = CACHED_BATCH_BYTES // 256
    assert cache_sized_batch(per_full) == 256
    assert cache_sized_batch(per_full + 1) == 128
    assert cache_sized_batch(612_864) == 32  # MobileNetV2Small's 22 Conv outputs at 96x96, as bool
    assert cache_sized_batch(CACHED_BATCH_BYTES) == 1
    assert cache_sized_batch(10 * CACHED_BATCH_BYTES) == 1


class _CountedReads:
    """An array-like that counts its reads (as a zarr or dask array would pay for each)."""

    def __init__(self, values: np.ndarray):
        self.values, self.shape, self.reads = values, values.shape, []

    def __getitem__(self, index):
        self.reads.append(index)
        return self.values[index]


def test_small_batches_of_array_likes_are_read_in_default_sized_blocks():
    """Batches smaller than the default come from blocks of 256 samples read
    once each, in order and whole, with their labels alongside."""
    values = np.arange(600 * 3, dtype=np.float32).reshape(600, 3)
    labels = np.arange(600)
    data = _CountedReads(values)
    batches = list(iter_batches(data, labels, batch_size=32))
    assert data.reads == [slice(0, 256), slice(256, 512), slice(512, 600)]
    assert [len(b.inputs) for b in batches] == [32] * 18 + [24]
    np.testing.assert_array_equal(np.concatenate([b.inputs for b in batches]), values)
    np.testing.assert_array_equal(np.concatenate([b.labels for b in batches]), labels)
    big = _CountedReads(values)
    assert [len(b.inputs) for b in iter_batches(big, batch_size=500)] == [500, 100]
    assert big.reads == [slice(0, 500), slice(500, 600)]
