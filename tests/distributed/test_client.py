"""analyze_sharded on the client: connecting, collecting results exactly once (also when workers
die), merging on the client, and the errors a user sees."""

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

from tensorstate_onnx import ModelFileError, OptionError, StateStore, StoreError, demo  # noqa: E402
from tensorstate_onnx import distributed as tsd  # noqa: E402
from tensorstate_onnx.capture import AbstractStateCapture  # noqa: E402
from tensorstate_onnx.distributed.client import _ClientMerger  # noqa: E402
from tensorstate_onnx.distributed.reduce import _Partial  # noqa: E402
from tensorstate_onnx.engine import StateCounter  # noqa: E402
from tensorstate_onnx.store import store_dirname  # noqa: E402


@pytest.mark.distributed
def test_scheduler_address_string(client, digits, reference, probes, assert_same_counts):
    x, y = digits
    result = tsd.analyze_sharded(
        demo.model_path(), x, labels=y, scheduler=client.scheduler.address, shard_size=100, **probes
    )
    assert_same_counts(reference[0], result.model)
    assert result.stats["n_workers"] == 2


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


def test_client_merger_merges_every_part_and_raises_a_merge_error(sorted_counts):
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, 4, (200, 5), dtype=np.uint8) for _ in range(5)]
    capture = AbstractStateCapture("p")
    merger = _ClientMerger([capture])
    for index, rows in enumerate(batches):
        counter = StateCounter(40)
        counter.add(rows)
        merger.submit(_Partial([index], ("p",), [counter], len(rows), 0, 0, (1,), index, [0.0], [], 0.0))
    merger.finish()
    reference = StateCounter(40)
    for rows in batches:
        reference.add(rows)
    assert capture.state_count == 1000
    for got, want in zip(sorted_counts(capture.counter), sorted_counts(reference)):
        assert np.array_equal(got, want)

    merger = _ClientMerger([AbstractStateCapture("p")])
    merger.submit(_Partial([0], ("p",), [StateCounter(40)], 0, 0, 0, (1,), 0, [0.0], [], 0.0))
    merger.submit(_Partial([1], ("p",), [StateCounter(16)], 0, 0, 0, (1,), 1, [0.0], [], 0.0))
    with pytest.raises(ValueError, match="cannot merge counts of 16 neurons into counts of 40"):
        merger.finish()


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
            merge_roots=100, **probes,  # no merge task shares a worker with the crashing shard
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
