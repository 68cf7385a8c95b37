"""Shard planning: every kind of data source gives the single-process counts; bad data fails early."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("distributed")
da = pytest.importorskip("dask.array")
import zarr  # noqa: E402

from tensorstate_onnx import ModelInputError, OptionError, demo  # noqa: E402
from tensorstate_onnx.distributed import analyze_sharded  # noqa: E402
from tensorstate_onnx.distributed.plan import _default_shard_size, _plan_shards  # noqa: E402
from tensorstate_onnx.runtime import OnnxEfficiencyModel  # noqa: E402


@pytest.fixture(scope="module")
def sources(digits, tmp_path_factory):
    x, y = digits
    root = tmp_path_factory.mktemp("sources")
    np.save(root / "x.npy", x)
    z = zarr.create_array(str(root / "x.zarr"), shape=x.shape, chunks=(50, 1, 28, 28), dtype="float32")
    z[:] = x
    return {
        "numpy": lambda: (x, dict(shard_size=37)),
        "numpy-pair": lambda: ((x, y), dict(shard_size=100)),
        "dask": lambda: (da.from_array(x, chunks=(45, 1, 28, 28)), {}),
        "dask-rechunked": lambda: (da.from_array(x, chunks=(360, 1, 14, 28)), dict(shard_size=90)),
        "zarr": lambda: (zarr.open_array(str(root / "x.zarr"), mode="r"), dict(shard_size=64)),
        "zarr-path": lambda: (str(root / "x.zarr"), dict(shard_size=64)),
        "npy-path": lambda: (root / "x.npy", dict(shard_size=50)),
    }


@pytest.mark.distributed
@pytest.mark.parametrize(
    "kind", ["numpy", "numpy-pair", "dask", "dask-rechunked", "zarr", "zarr-path", "npy-path"]
)
def test_every_array_source_gives_single_process_counts(
    client, digits, reference, sources, probes, assert_same_counts, kind
):
    x, y = digits
    data, options = sources[kind]()
    labels = None if kind == "numpy-pair" else y
    result = analyze_sharded(
        demo.model_path(), data, labels=labels, client=client, batch_size=16, **options, **probes
    )
    expected, accuracy = reference
    assert_same_counts(expected, result.model)
    assert result.accuracy == accuracy
    assert result.n_samples == len(x)
    assert result.n_shards > 1


@pytest.mark.distributed
def test_callable_source_and_unpacking(client, digits, reference, probes, batches, assert_same_counts):
    x, y = digits
    source = batches(x, y, size=40)
    model, accuracy = analyze_sharded(
        str(demo.model_path()), source, n_shards=source.n_shards(), client=client, **probes
    )
    expected, expected_accuracy = reference
    assert_same_counts(expected, model)
    assert accuracy == expected_accuracy
    assert isinstance(model, OnnxEfficiencyModel)


@pytest.mark.distributed
def test_without_labels_accuracy_is_none_and_counts_match(client, digits, probes, assert_same_counts):
    x, _ = digits
    result = analyze_sharded(demo.model_path(), x[:200], client=client, shard_size=64, **probes)
    assert result.accuracy is None
    expected = OnnxEfficiencyModel(demo.model_path(), providers="cpu", **probes)
    expected.predict(x[:200])
    assert_same_counts(expected, result.model)


@pytest.mark.distributed
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, y, batches: (np.empty((0, 1, 28, 28), np.float32), {}), "no samples"),
        (lambda x, y, batches: (da.zeros((0, 1, 28, 28), chunks=(10, 1, 28, 28)), {}), "no samples"),
        (lambda x, y, batches: (batches(x[:0], y[:0], size=10), dict(n_shards=3)), "no samples"),
        (lambda x, y, batches: (batches(x, y, size=10), dict(n_shards=0)), "no samples"),
        (lambda x, y, batches: (x, dict(labels=y[:10])), "10 labels for 360 samples"),
        (lambda x, y, batches: (batches(x, y, size=10), {}), "n_shards"),
    ],
)
def test_empty_and_inconsistent_data(client, digits, probes, batches, make, match):
    x, y = digits
    data, options = make(x, y, batches)
    with pytest.raises(ValueError, match=match):
        analyze_sharded(demo.model_path(), data, client=client, **options, **probes)


def test_a_dict_of_inputs_is_split_input_by_input_with_its_labels():
    a, b = np.arange(10.0).reshape(10, 1), np.arange(20.0).reshape(10, 2)
    shards, blocks, total, shape = _plan_shards({"a": a, "b": b}, np.arange(10), 4, None, None, 2, 256)
    assert blocks is None and total == 10 and shape == (("a", (1,)), ("b", (2,)))
    assert [(s.start, s.stop, s.kind) for s in shards] == [(0, 4, "array"), (4, 8, "array"), (8, 10, "array")]
    assert np.array_equal(shards[1].source["b"], b[4:8]) and np.array_equal(shards[2].labels, [8, 9])
    with pytest.raises(ModelInputError, match="inputs have different numbers of samples"):
        _plan_shards({"a": a, "b": b[:9]}, None, 4, None, None, 2, 256)
    with pytest.raises(ModelInputError, match="got 9 labels for 10 samples"):
        _plan_shards({"a": a, "b": b}, np.arange(9), 4, None, None, 2, 256)


def test_default_shards_of_a_fixed_batch_model_hold_whole_batches():
    assert _default_shard_size(100, 2, 3, whole_batches=True) == 15  # 13 rounded up to batches of 3
    assert _default_shard_size(100, 2, 16, whole_batches=True) == 16  # never less than a batch
    assert _default_shard_size(10**6, 1, 3, whole_batches=True) == 4095  # the cap, in whole batches
    assert _default_shard_size(100, 2, 16, whole_batches=False) == 13  # free batches: as before
    shards, _, total, _ = _plan_shards(np.zeros((102, 4)), None, None, None, None, 2, 3, True)
    assert total == 102 and all((s.stop - s.start) % 3 == 0 for s in shards) and len(shards) > 1


@pytest.mark.distributed
def test_a_model_with_a_fixed_batch_is_sharded_without_a_batch_size(client, fixed_batch_relu):
    """Left out, the batch size is the model's fixed one (before, 256 was sent
    to the workers, which refused it), and shards hold whole batches; data,
    a shard_size or dask chunks that cannot are refused before the run."""
    x = np.random.default_rng(1).normal(size=(30, 4)).astype(np.float32)
    model = fixed_batch_relu(2)
    result = analyze_sharded(model, x, "Relu", client=client)
    expected = OnnxEfficiencyModel(model, "Relu", providers="cpu")
    expected.predict(x, progress=False)
    assert result.n_shards > 1 and result.n_samples == 30
    got, want = result.model.efficiency_layers[0], expected.efficiency_layers[0]
    assert got.state_count == want.state_count == 30
    assert sorted(got.counts().tolist()) == sorted(want.counts().tolist())
    with pytest.raises(OptionError, match="shard_size=5 cannot be used; give a multiple of 2"):
        analyze_sharded(model, x, "Relu", client=client, shard_size=5)
    with pytest.raises(OptionError, match="batch_size=3 cannot be used"):
        analyze_sharded(model, x, "Relu", client=client, batch_size=3)
    with pytest.raises(ModelInputError, match="the data holds 29; give a multiple of 2"):
        analyze_sharded(model, x[:29], "Relu", client=client)
    with pytest.raises(ModelInputError, match=r"shard 0 \(samples 0..4\) holds 5 samples, .* exactly 2; give shard_size"):
        analyze_sharded(model, da.from_array(x, chunks=(5, 4)), "Relu", client=client)
    rechunked = analyze_sharded(model, da.from_array(x, chunks=(5, 4)), "Relu", client=client, shard_size=6)
    assert rechunked.n_shards == 5 and rechunked.model.efficiency_layers[0].state_count == 30
