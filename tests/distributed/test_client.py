"""analyze_sharded on the client: connecting, collecting results exactly once (also when workers
die), the counts left on the cluster, and the errors a user sees."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("distributed")

from tensorstate_onnx import ModelFileError, NoStatesError, OptionError, StateStore, StoreError, demo  # noqa: E402
from tensorstate_onnx import distributed as tsd  # noqa: E402
from tensorstate_onnx.store import store_dirname  # noqa: E402


@pytest.mark.distributed
def test_scheduler_address_string(client, digits, reference, probes, assert_same_metrics):
    x, y = digits
    result = tsd.analyze_sharded(
        demo.model_path(), x, labels=y, scheduler=client.scheduler.address, shard_size=100, **probes
    )
    assert_same_metrics(reference[0], result.model)
    assert result.stats["n_workers"] == 2
    # The run's own client is closed: the merged counters went with it, and counts() says how to keep them.
    capture = result.model.efficiency_layers[0]
    for ask in (capture.counts, capture.state_ids):
        with pytest.raises(NoStatesError, match=r"run analyze_sharded with client= .*or give storage_path="):
            ask()
    # Firing rates need no states: each partition sends its per-neuron firing counts.
    for want, have in zip(reference[0].efficiency_layers, result.model.efficiency_layers, strict=True):
        assert np.array_equal(have.firing_counts(), want.firing_counts()), want.name
        assert np.array_equal(have.dead_neurons(), want.dead_neurons())


@pytest.mark.distributed
def test_counts_stay_on_the_cluster_until_asked_for_and_released(client, digits, reference, probes, sorted_counts):
    x, _ = digits
    result = tsd.analyze_sharded(demo.model_path(), x, client=client, shard_size=60, partitions=3, **probes)
    want = reference[0].efficiency_layers[1]
    capture = result.model.efficiency_layers[1]
    assert capture.entropy(2) == want.entropy(2)
    assert capture._counter is None, "the client holds counts nobody asked for"
    for got, expected in zip(sorted_counts(capture.counter), sorted_counts(want.counter)):
        assert np.array_equal(got, expected)
    assert sorted(capture.state_ids()) == sorted(want.state_ids())
    result.release()
    other = result.model.efficiency_layers[2]
    assert other.efficiency() == reference[0].efficiency_layers[2].efficiency()
    with pytest.raises(NoStatesError, match=r"released \(ShardedAnalysis.release\(\)\)"):
        other.counts()


@pytest.mark.slow
@pytest.mark.distributed
def test_with_storage_counts_are_rebuilt_from_the_stored_states(digits, reference, probes, tmp_path):
    x, _ = digits
    result = tsd.analyze_sharded(
        demo.model_path(), x, n_workers=2, shard_size=90, storage_path=tmp_path / "s", **probes
    )  # own cluster, closed at the end
    for want, have in zip(reference[0].efficiency_layers, result.model.efficiency_layers):
        assert sorted(have.counts()) == sorted(want.counts())
        assert sorted(have.state_ids()) == sorted(want.state_ids())


def test_a_refused_scheduler_port_is_reported_at_once(digits, probes):
    x, _ = digits
    # Dask would retry until the timeout; a refusal is final, so it is reported without waiting.
    with pytest.raises(tsd.SchedulerConnectionError, match=r"nothing listens at tcp://127\.0\.0\.1:1 "):
        tsd.analyze_sharded(demo.model_path(), x, scheduler="tcp://127.0.0.1:1", timeout=600, **probes)


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), True, "30"])
def test_timeout_must_be_a_positive_number(digits, probes, timeout):
    with pytest.raises(OptionError, match="timeout must be a positive number of seconds"):
        tsd.analyze_sharded(demo.model_path(), digits[0], scheduler="tcp://127.0.0.1:1", timeout=timeout, **probes)


@pytest.mark.distributed
def test_model_the_client_cannot_read(client, digits, probes, tmp_path):
    x, _ = digits
    with pytest.raises(ModelFileError, match="nope.onnx"):
        tsd.analyze_sharded(tmp_path / "nope.onnx", x, client=client, **probes)


def test_missing_dask_gives_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    with pytest.raises(ImportError, match=r"pip install 'tensorstate-onnx\[distributed\]'"):
        tsd.analyze_sharded(demo.model_path(), np.zeros((1, 1, 28, 28), np.float32), "Conv")


def test_importing_the_package_does_not_import_dask():
    code = "import sys, tensorstate_onnx; print(any(m.split('.')[0] in ('dask', 'distributed') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_sharded_api_imports_from_the_package_without_dask():
    code = (
        "import sys, tensorstate_onnx.distributed as d; "
        "from tensorstate_onnx.errors import ShardFailedError, SchedulerConnectionError; "
        "assert d.ShardFailedError is ShardFailedError and d.SchedulerConnectionError is SchedulerConnectionError; "
        "assert callable(d.analyze_sharded) and d.ShardedAnalysis; "
        "print(any(m.split('.')[0] in ('dask', 'distributed') for m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --------------------------------------------------------------------------- faults (each kills workers of its own cluster)


@pytest.mark.slow
@pytest.mark.distributed
def test_worker_killed_mid_run_is_retried_and_counted_once(
    own_client, digits, reference, probes, batches, assert_same_counts, stored_rows, tmp_path
):
    client = own_client
    x, y = digits
    signals = tmp_path / "signals"
    signals.mkdir()
    source = batches(x, y, size=45, slow={3}, signal_dir=signals, sleep=2.0)
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
        storage_path=tmp_path / "states", **probes,
    )  # fmt: skip
    thread.join()
    assert killed, "the slow shard never started"
    assert len(list(signals.iterdir())) >= 2, "the killed shard was not run again"
    assert_same_counts(reference[0], result.model)
    assert result.accuracy == reference[1]
    for capture in reference[0].efficiency_layers:
        assert np.array_equal(stored_rows(tmp_path / "states", capture.name), capture.states[:])


@pytest.mark.slow
@pytest.mark.distributed
def test_a_shard_that_always_kills_its_worker_fails_clearly(own_client, digits, reference, probes, batches, tmp_path):
    x, y = digits
    source = batches(x, y, size=60, crash={2})
    root = tmp_path / "states"
    with pytest.raises(tsd.ShardFailedError, match=r"shard 2 \(samples 120\.\.179\).*allowed-failures=1"):
        tsd.analyze_sharded(
            demo.model_path(), source, shard_sizes=source.sizes(), client=own_client, storage_path=root,
            **probes,
        )  # fmt: skip
    # What was stored stays readable; finished shards hold their rows.
    for capture in reference[0].efficiency_layers:
        store = StateStore.open(root / store_dirname(capture.name))
        meta = store.metadata
        assert meta["complete"] is False and 2 not in meta["shards_written"]
        per = meta["states_per_instance"]
        want = capture.states[:]
        # Rows count up to the first missing shard; finished shards past it read by region.
        first_gap = next(k for k in range(5) if k not in meta["shards_written"])
        assert len(store) == meta["rows_written"] == first_gap * 60 * per
        assert np.array_equal(store.read(), want[: first_gap * 60 * per])
        for shard in meta["shards_written"]:
            region = slice(shard * 60 * per, (shard + 1) * 60 * per)
            assert np.array_equal(store.read(region), want[region])
        with pytest.raises(IndexError, match="never completely written"):
            store.read(slice(120 * per, 180 * per))
        with pytest.raises(StoreError, match="holds only its first"):
            store.array  # noqa: B018


@pytest.mark.distributed
def test_workers_started_for_a_run_keep_freed_memory(monkeypatch):
    """The workers a run starts get WORKER_ENVIRON before their process starts (glibc
    reads it only then), and keep Dask's other pre-spawn settings."""
    distributed = pytest.importorskip("distributed")
    from tensorstate_onnx.distributed.connect import WORKER_ENVIRON, local_cluster

    names = (*WORKER_ENVIRON, "OMP_NUM_THREADS")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # as a cluster Dask started before leaves it
    cluster = local_cluster(1, 1)
    try:
        with distributed.Client(cluster, set_as_default=False) as client:
            (seen,) = client.run(lambda: {name: os.environ.get(name) for name in names}).values()
    finally:
        cluster.close()
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # this process's environment is put back
    assert seen == {**WORKER_ENVIRON, "OMP_NUM_THREADS": "1"}
    assert int(WORKER_ENVIRON["MALLOC_TRIM_THRESHOLD_"]) >= 2**30
