"""Sharded analysis on Dask: same counts as one process, storage regions, faults, bad input.

One LocalCluster (2 worker processes, 1 thread each) serves the whole module;
the fault tests kill its workers and run last (their nannies restart them).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
dask = pytest.importorskip("dask")
da = pytest.importorskip("dask.array")
import cloudpickle  # noqa: E402  (installed with distributed)
import zarr  # noqa: E402

from tensorstate_onnx import ModelFileError, StateStore, StorageExistsError, demo  # noqa: E402
from tensorstate_onnx import distributed as tsd  # noqa: E402
from tensorstate_onnx.engine import StateCounter  # noqa: E402
from tensorstate_onnx.graph import save_model  # noqa: E402
from tensorstate_onnx.models.onnx_models import mobilenet_v2_small_onnx  # noqa: E402
from tensorstate_onnx.runtime import OnnxEfficiencyModel  # noqa: E402
from tensorstate_onnx.store import store_dirname  # noqa: E402

# Data sources defined here run on the workers, which cannot import this file.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROBES = dict(attach_to=["Conv", "Gemm"], method="both")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def client():
    with dask.config.set(
        {
            "distributed.scheduler.allowed-failures": 1,  # a shard may kill one worker, not two
            "distributed.scheduler.worker-saturation": 1.0,  # one task in flight per worker
        }
    ):
        cluster = distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
            silence_logs=50,
        )  # fmt: skip
    client = distributed.Client(cluster, set_as_default=False)
    yield client
    client.close()
    cluster.close()


@pytest.fixture(scope="module")
def digits():
    return demo.load_test_data()


@pytest.fixture(scope="module")
def reference(digits):
    """Single-process analysis of the whole demo set, raw states kept."""
    x, y = digits
    model = OnnxEfficiencyModel(demo.model_path(), providers="cpu", keep_states=True, **PROBES)
    accuracy = model.evaluate(x, y, batch_size=64)
    return model, accuracy


def sorted_counts(counter: StateCounter) -> tuple[np.ndarray, np.ndarray]:
    """``counter.result()`` in byte order (the engine may return another order)."""
    ids, counts = counter.result()
    order = np.lexsort(ids.T[::-1]) if ids.shape[1] else np.arange(len(ids))
    return ids[order], counts[order]


def assert_same_counts(expected: OnnxEfficiencyModel, got: OnnxEfficiencyModel) -> None:
    assert [c.name for c in got.efficiency_layers] == [c.name for c in expected.efficiency_layers]
    for want, have in zip(expected.efficiency_layers, got.efficiency_layers):
        ids_want, counts_want = sorted_counts(want.counter)
        ids_have, counts_have = sorted_counts(have.counter)
        assert np.array_equal(ids_have, ids_want), want.name
        assert np.array_equal(counts_have, counts_want), want.name
        assert have.state_count == want.state_count
        assert have.n_neurons == want.n_neurons
        assert have.efficiency() == pytest.approx(want.efficiency(), rel=1e-12, abs=1e-12)


def wait_for_two_workers(client):
    client.wait_for_workers(2, timeout=60)


# --------------------------------------------------------------------------- sources


class Batches:
    """A callable data source: shard i is samples [i*size, (i+1)*size) in (x, y) batches.

    ``slow`` shards write ``<pid>`` into ``signal_dir`` and sleep first;
    ``crash`` shards end their worker process on every attempt.
    """

    def __init__(self, x, y, size, batch=16, slow=(), crash=(), signal_dir=None, sleep=2.0, wrong_shape=()):
        self.x, self.y, self.size, self.batch = x, y, size, batch
        self.slow, self.crash, self.signal_dir, self.sleep = set(slow), set(crash), signal_dir, sleep
        self.wrong_shape = set(wrong_shape)

    def __call__(self, index):
        if index in self.crash:
            os._exit(13)
        if index in self.slow:
            Path(self.signal_dir, f"{index}-{os.getpid()}").write_text(str(os.getpid()))
            time.sleep(self.sleep)
        start, stop = index * self.size, min(len(self.x), (index + 1) * self.size)
        for b in range(start, stop, self.batch):
            e = min(stop, b + self.batch)
            x = self.x[b:e]
            if index in self.wrong_shape:
                x = np.zeros((e - b, 1, 32, 32), np.float32)
            yield x, self.y[b:e]

    def n_shards(self):
        return -(-len(self.x) // self.size)

    def sizes(self):
        return [min(len(self.x), (i + 1) * self.size) - i * self.size for i in range(self.n_shards())]


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


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "kind", ["numpy", "numpy-pair", "dask", "dask-rechunked", "zarr", "zarr-path", "npy-path"]
)
def test_every_array_source_gives_single_process_counts(client, digits, reference, sources, kind):
    x, y = digits
    data, options = sources[kind]()
    labels = None if kind == "numpy-pair" else y
    result = tsd.analyze_sharded(
        demo.model_path(), data, labels=labels, client=client, batch_size=16, **options, **PROBES
    )
    expected, accuracy = reference
    assert_same_counts(expected, result.model)
    assert result.accuracy == accuracy
    assert result.n_samples == len(x)
    assert result.n_shards > 1


def test_callable_source_and_unpacking(client, digits, reference):
    x, y = digits
    source = Batches(x, y, size=40)
    model, accuracy = tsd.analyze_sharded(
        str(demo.model_path()), source, n_shards=source.n_shards(), client=client, **PROBES
    )
    expected, expected_accuracy = reference
    assert_same_counts(expected, model)
    assert accuracy == expected_accuracy
    assert isinstance(model, OnnxEfficiencyModel)


def test_without_labels_accuracy_is_none_and_counts_match(client, digits, reference):
    x, _ = digits
    result = tsd.analyze_sharded(demo.model_path(), x[:200], client=client, shard_size=64, **PROBES)
    assert result.accuracy is None
    expected = OnnxEfficiencyModel(demo.model_path(), providers="cpu", **PROBES)
    expected.predict(x[:200])
    assert_same_counts(expected, result.model)


@pytest.mark.parametrize("fan_in, roots", [(2, 1), (3, 1), (2, 2), (2, None), (4, 5)])
def test_reduction_tree_shapes_give_the_same_counts(client, digits, reference, fan_in, roots):
    x, y = digits
    result = tsd.analyze_sharded(
        demo.model_path(), x, labels=y, client=client, shard_size=30, merge_fan_in=fan_in,
        merge_roots=roots, **PROBES,
    )  # fmt: skip
    assert_same_counts(reference[0], result.model)
    assert result.accuracy == reference[1]
    assert len(result.stats["shard_seconds"]) == 12
    merges = len(result.stats["merge_task_seconds"])
    # 12 shards; by default the client merges up to 32 partials itself.
    assert merges == {(2, 1): 11, (3, 1): 6, (2, 2): 10, (2, None): 0, (4, 5): 3}[(fan_in, roots)]


@pytest.mark.parametrize("pack_in_graph, as_path", [(False, False), (True, True)])
def test_mobilenet_all_convs_match_single_process(client, tmp_path, pack_in_graph, as_path):
    proto = mobilenet_v2_small_onnx()
    model = save_model(proto, tmp_path / "mobilenet.onnx") if as_path else proto  # a proto goes as bytes
    x = np.random.default_rng(1).normal(size=(20, 3, 96, 96)).astype(np.float32)
    expected = OnnxEfficiencyModel(proto, "Conv", providers="cpu", pack_in_graph=pack_in_graph, keep_states=True)
    expected.predict(x, batch_size=8)
    result = tsd.analyze_sharded(
        model, x, "Conv", client=client, shard_size=7, batch_size=4, pack_in_graph=pack_in_graph,
        storage_path=tmp_path / "states",
    )  # fmt: skip
    assert len(result.model.efficiency_layers) == 22
    assert_same_counts(expected, result.model)
    for capture in expected.efficiency_layers:
        assert np.array_equal(_stored_rows(tmp_path / "states", capture.name), capture.states[:])


def test_own_local_cluster_and_cli_entry_point(digits, reference, tmp_path):
    x, y = digits
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    model, accuracy = tsd.analyze_cli(
        str(demo.model_path()), str(tmp_path / "x.npy"), str(tmp_path / "y.npy"), ["Conv", "Gemm"],
        [], "both", 64, 2, None, None, False,
    )  # fmt: skip
    assert_same_counts(reference[0], model)
    assert accuracy == reference[1]


def test_scheduler_address_string(client, digits, reference):
    x, y = digits
    result = tsd.analyze_sharded(
        demo.model_path(), x, labels=y, scheduler=client.scheduler.address, shard_size=100, **PROBES
    )
    assert_same_counts(reference[0], result.model)
    assert result.stats["n_workers"] == 2


# --------------------------------------------------------------------------- storage


def _stored_rows(root: Path, name: str) -> np.ndarray:

    return StateStore.open(root / store_dirname(name)).read()


@pytest.mark.parametrize("shard_size", [37, 100, 360])
def test_storage_regions_hold_rows_in_dataset_order(client, digits, reference, tmp_path, shard_size):
    x, y = digits
    root = tmp_path / "states"
    result = tsd.analyze_sharded(
        demo.model_path(), x, labels=y, client=client, shard_size=shard_size, batch_size=16,
        storage_path=root, **PROBES,
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
        tsd.analyze_sharded(demo.model_path(), x, client=client, storage_path=root, **PROBES)


def test_storage_with_a_callable_needs_shard_sizes(client, digits, reference, tmp_path):
    x, y = digits
    source = Batches(x, y, size=90, batch=32)
    with pytest.raises(ValueError, match="shard_sizes"):
        tsd.analyze_sharded(
            demo.model_path(), source, n_shards=4, client=client, storage_path=tmp_path / "a", **PROBES
        )
    result = tsd.analyze_sharded(
        demo.model_path(), source, shard_sizes=source.sizes(), client=client,
        storage_path=tmp_path / "b", **PROBES,
    )  # fmt: skip
    assert_same_counts(reference[0], result.model)
    for capture in reference[0].efficiency_layers:
        assert np.array_equal(_stored_rows(tmp_path / "b", capture.name), capture.states[:])


# --------------------------------------------------------------------------- bad input


def test_unreachable_scheduler_fails_within_the_timeout(digits):
    x, _ = digits
    started = time.monotonic()
    with pytest.raises(tsd.SchedulerConnectionError, match="127.0.0.1:1"):
        tsd.analyze_sharded(demo.model_path(), x, scheduler="tcp://127.0.0.1:1", timeout=2, **PROBES)
    assert time.monotonic() - started < 20


def test_shards_of_mismatched_shape_name_the_shard(client, digits):
    x, y = digits
    source = Batches(x, y, size=120, wrong_shape={1})
    with pytest.raises(ValueError, match=r"shard 1\b.*\(\d+, 1, 32, 32\)"):
        tsd.analyze_sharded(demo.model_path(), source, n_shards=3, client=client, **PROBES)


def test_mismatched_shapes_between_shards_of_a_dynamic_model(client):
    # The MobileNet has a fully convolutional trunk, but spatial sizes are fixed;
    # build a model with a dynamic spatial size to reach the cross-shard check.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 1, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H2", "W2"])], initializer=[w],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)

    def shard(i):
        size = 8 if i == 2 else 10
        yield np.ones((3, 1, size, size), np.float32)

    with pytest.raises(ValueError, match=r"shard \d has samples of shape \(1, \d+, \d+\) but shard \d has") as info:
        tsd.analyze_sharded(proto, shard, "Conv", n_shards=4, client=client, merge_roots=1)
    assert "shard 2" in str(info.value) and "(1, 8, 8)" in str(info.value)


def test_model_the_workers_cannot_read(client, digits, tmp_path):
    x, _ = digits
    missing = tmp_path / "elsewhere" / "model.onnx"
    with pytest.raises(ModelFileError, match=re.escape(str(missing))) as info:
        tsd.analyze_sharded(
            demo.model_path(), x, client=client, worker_model_path=missing, shard_size=120, **PROBES
        )
    assert "shard" in str(info.value) and "worker pid" in str(info.value)


def test_model_the_client_cannot_read(client, digits, tmp_path):
    x, _ = digits
    with pytest.raises(ModelFileError, match="nope.onnx"):
        tsd.analyze_sharded(tmp_path / "nope.onnx", x, client=client, **PROBES)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, y: (np.empty((0, 1, 28, 28), np.float32), {}), "no samples"),
        (lambda x, y: (da.zeros((0, 1, 28, 28), chunks=(10, 1, 28, 28)), {}), "no samples"),
        (lambda x, y: (Batches(x[:0], y[:0], size=10), dict(n_shards=3)), "no samples"),
        (lambda x, y: (Batches(x, y, size=10), dict(n_shards=0)), "no samples"),
        (lambda x, y: (x, dict(labels=y[:10])), "10 labels for 360 samples"),
        (lambda x, y: (Batches(x, y, size=10), {}), "n_shards"),
    ],
)
def test_empty_and_inconsistent_data(client, digits, make, match):
    x, y = digits
    data, options = make(x, y)
    with pytest.raises(ValueError, match=match):
        tsd.analyze_sharded(demo.model_path(), data, client=client, **options, **PROBES)


def test_missing_dask_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r"pip install 'tensorstate-onnx\[distributed\]'"):
        tsd.analyze_sharded(demo.model_path(), np.zeros((1, 1, 28, 28), np.float32), "Conv")


def test_importing_the_package_does_not_import_dask():
    code = "import sys, tensorstate_onnx; print(any(m.split('.')[0] in ('dask', 'distributed') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- merge purity


def test_merge_tasks_never_modify_their_inputs():
    rng = np.random.default_rng(0)

    def partial(index, rows):
        counter = StateCounter(40)
        counter.add(rows)
        return tsd._Partial([index], ("p",), [counter], len(rows), 0, 0, (1,), index, [0.0], [], 0.0)

    a = partial(0, rng.integers(0, 256, (500, 5), dtype=np.uint8))
    b = partial(1, rng.integers(0, 256, (300, 5), dtype=np.uint8))
    before = [sorted_counts(p.counters[0]) for p in (a, b)]
    merged = tsd._merge_partials(a, b)
    again = tsd._merge_partials(a, b)  # what a retried merge task would compute
    for p, (ids, counts) in zip((a, b), before):
        assert np.array_equal(sorted_counts(p.counters[0])[0], ids)
        assert np.array_equal(sorted_counts(p.counters[0])[1], counts)
    assert merged.counters[0].total == 800 == again.counters[0].total
    assert merged.shards == [0, 1]


def test_client_merger_merges_every_part_and_raises_a_merge_error():
    from tensorstate_onnx.capture import AbstractStateCapture

    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 4, (200, 5), dtype=np.uint8) for _ in range(5)]
    capture = AbstractStateCapture("p")
    merger = tsd._ClientMerger([capture])
    for index, rows in enumerate(batches):
        counter = StateCounter(40)
        counter.add(rows)
        merger.submit(tsd._Partial([index], ("p",), [counter], len(rows), 0, 0, (1,), index, [0.0], [], 0.0))
    merger.finish()
    reference = StateCounter(40)
    for rows in batches:
        reference.add(rows)
    assert capture.state_count == 1000
    for got, want in zip(sorted_counts(capture.counter), sorted_counts(reference)):
        assert np.array_equal(got, want)

    merger = tsd._ClientMerger([AbstractStateCapture("p")])
    merger.submit(tsd._Partial([0], ("p",), [StateCounter(40)], 0, 0, 0, (1,), 0, [0.0], [], 0.0))
    merger.submit(tsd._Partial([1], ("p",), [StateCounter(16)], 0, 0, 0, (1,), 1, [0.0], [], 0.0))
    with pytest.raises(ValueError, match="cannot merge counts of 16 neurons into counts of 40"):
        merger.finish()


def test_chunk_size_divides_shard_boundaries():
    assert tsd._largest_divisor_at_most(37, 1000) == 37
    assert tsd._largest_divisor_at_most(360, 100) == 90
    assert tsd._largest_divisor_at_most(97, 50) == 1


# --------------------------------------------------------------------------- faults (last: they kill workers)


def test_worker_killed_mid_run_is_retried_and_counted_once(client, digits, reference, tmp_path):
    wait_for_two_workers(client)
    x, y = digits
    signals = tmp_path / "signals"
    signals.mkdir()
    source = Batches(x, y, size=45, slow={3}, signal_dir=signals, sleep=2.0)
    pids = set(client.run(os.getpid).values())
    killed = []

    def killer():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            files = list(signals.iterdir())
            if files:
                pid = int(files[0].read_text())
                assert pid in pids
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    result = tsd.analyze_sharded(
        demo.model_path(), source, shard_sizes=source.sizes(), client=client,
        storage_path=tmp_path / "states", **PROBES,
    )  # fmt: skip
    thread.join()
    assert killed, "the slow shard never started"
    assert len(list(signals.iterdir())) >= 2, "the killed shard was not run again"
    assert_same_counts(reference[0], result.model)
    assert result.accuracy == reference[1]
    for capture in reference[0].efficiency_layers:
        assert np.array_equal(_stored_rows(tmp_path / "states", capture.name), capture.states[:])


def test_a_shard_that_always_kills_its_worker_fails_clearly(client, digits, reference, tmp_path):
    wait_for_two_workers(client)
    x, y = digits
    source = Batches(x, y, size=60, crash={2})
    root = tmp_path / "states"
    with pytest.raises(tsd.ShardFailedError, match=r"shard 2 \(samples 120\.\.179\).*allowed-failures=1"):
        tsd.analyze_sharded(
            demo.model_path(), source, shard_sizes=source.sizes(), client=client, storage_path=root,
            merge_roots=100, **PROBES,  # no merge task shares a worker with the crashing shard
        )  # fmt: skip
    # What was stored stays readable; finished shards hold their rows.
    for capture in reference[0].efficiency_layers:
        store = StateStore.open(root / store_dirname(capture.name))
        meta = store.metadata
        assert meta["complete"] is False and 2 not in meta["shards_written"]
        per = meta["states_per_instance"]
        rows = store.read()
        want = capture.states[:]
        for shard in meta["shards_written"]:
            region = slice(shard * 60 * per, (shard + 1) * 60 * per)
            assert np.array_equal(rows[region], want[region])
    wait_for_two_workers(client)
