"""Raw states of sharded runs: each shard writes its own whole-chunk region, rows in dataset order."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

pytest.importorskip("distributed")

from tensorstate_onnx import StateStore, StorageExistsError, demo  # noqa: E402
from tensorstate_onnx.distributed import analyze_sharded  # noqa: E402
from tensorstate_onnx.distributed.storage import (  # noqa: E402
    _largest_divisor_at_most,
    _RegionWriter,
    _states_per_instance,
)
from tensorstate_onnx.graph import Probe  # noqa: E402
from tensorstate_onnx.store import store_dirname  # noqa: E402


@pytest.mark.distributed
@pytest.mark.parametrize("shard_size", [pytest.param(37, marks=pytest.mark.slow), 100, 360])
def test_storage_regions_hold_rows_in_dataset_order(client, digits, reference, probes, tmp_path, shard_size):
    x, y = digits
    root = tmp_path / "states"
    result = analyze_sharded(
        demo.model_path(), x, labels=y, client=client, shard_size=shard_size, batch_size=16,
        storage_path=root, **probes,
    )  # fmt: skip
    expected = reference[0]
    starts = list(range(0, len(x), shard_size))
    for capture in expected.efficiency_layers:
        store = StateStore.open(root / store_dirname(capture.name))
        rows = store.read()
        assert np.array_equal(rows, capture.states[:]), capture.name
        meta = store.metadata
        assert meta["complete"] is True and meta["shards_written"] == list(range(len(starts)))
        assert meta["name"] == capture.name and meta["n_neurons"] == capture.n_neurons
        per = meta["states_per_instance"]
        chunk = store.array.chunks[0]
        assert all(start * per % chunk == 0 for start in starts), "a chunk straddles two shards"
    # The result's captures read the stored states like a single-process run's.
    for want, have in zip(expected.efficiency_layers, result.model.efficiency_layers):
        assert np.array_equal(have.states[:], want.states[:])
        assert np.array_equal(have.counts(index=[3, 200, 359]), want.counts(index=[3, 200, 359]))
    with pytest.raises(StorageExistsError):
        analyze_sharded(demo.model_path(), x, client=client, storage_path=root, **probes)


@pytest.mark.parametrize(
    ("shape", "axis", "fixed_batch", "expected"),
    [
        ((None, 7, 12), 2, None, 7),  # batch first, free batch axis
        ((7, None, 12), 2, None, 7),  # sequence first: the free axis is the batch
        ((7, 4, 12), 2, 4, 7),  # sequence first, batch fixed at 4
        ((4, 7, 12), 2, 4, 7),
        ((None, 8, 5, 5), 1, None, 25),
        ((None, None, 12), 2, None, None),  # free batch and length: not static
        ((None, 12), 1, None, 1),
    ],
)
def test_states_per_sample_of_a_probe_skip_its_batch_axis_wherever_it_is(shape, axis, fixed_batch, expected):
    probe = Probe("p", "p", "n", "MatMul", "after", "t", "t", axis, shape, shape[axis], False)
    assert _states_per_instance(probe, fixed_batch) == expected


@pytest.mark.distributed
def test_storage_with_a_callable_needs_shard_sizes(
    client, digits, reference, probes, batches, assert_same_counts, stored_rows, tmp_path
):
    x, y = digits
    source = batches(x, y, size=90, batch=32)
    with pytest.raises(ValueError, match="shard_sizes"):
        analyze_sharded(
            demo.model_path(), source, n_shards=4, client=client, storage_path=tmp_path / "a", **probes
        )
    result = analyze_sharded(
        demo.model_path(), source, shard_sizes=source.sizes(), client=client,
        storage_path=tmp_path / "b", **probes,
    )  # fmt: skip
    assert_same_counts(reference[0], result.model)
    for capture in reference[0].efficiency_layers:
        assert np.array_equal(stored_rows(tmp_path / "b", capture.name), capture.states[:])


def test_chunk_size_divides_shard_boundaries():
    assert _largest_divisor_at_most(37, 1000) == 37
    assert _largest_divisor_at_most(360, 100) == 90
    assert _largest_divisor_at_most(97, 50) == 1


def test_region_writer_fills_exactly_its_region_in_whole_chunks(tmp_path):
    path = str(tmp_path / "array")
    zarr.create_array(zarr.storage.LocalStore(path), shape=(40, 2), chunks=(8, 2), dtype="uint8", fill_value=0)
    rows = np.arange(32, dtype=np.uint8).reshape(16, 2)
    writer = _RegionWriter(path, 16, 16, 8, "shard 1")
    writer.append(rows[:5])
    assert not zarr.open_array(path)[16:].any(), "a partial chunk was written before the chunk was full"
    writer.append(rows[5:11])  # the first chunk is complete: written now, the rest waits
    assert np.array_equal(zarr.open_array(path)[16:24], rows[:8]) and not zarr.open_array(path)[24:].any()
    with pytest.raises(ValueError, match="shard 1 produced more than the 16 states expected"):
        writer.append(rows)
    writer.append(rows[11:])
    writer.close()
    stored = zarr.open_array(path)[:]
    assert np.array_equal(stored[16:32], rows) and not stored[:16].any() and not stored[32:].any()

    short = _RegionWriter(path, 32, 8, 8, "shard 2")
    short.append(rows[:3])
    with pytest.raises(ValueError, match="shard 2 produced 3 states .* 8 were expected"):
        short.close()
