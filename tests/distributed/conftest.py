"""Fixtures of the sharded-analysis tests: Dask clusters, the demo data and its
single-process reference, a callable data source, and count comparisons.

Each test module shares one LocalCluster (2 worker processes, 1 thread each);
tests that kill workers get a cluster of their own (``own_client``).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tensorstate_onnx import StateStore, aIQ, demo, network_efficiency
from tensorstate_onnx.engine import StateCounter
from tensorstate_onnx.runtime import OnnxEfficiencyModel
from tensorstate_onnx.store import store_dirname

try:
    import cloudpickle  # installed with distributed
except ImportError:  # without Dask every test module here skips itself
    pass
else:
    # Data sources defined here run on the workers, which cannot import this file.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

PROBES = dict(attach_to=["Conv", "Gemm"], method="both")


@contextmanager
def _local_client():
    distributed = pytest.importorskip("distributed")
    dask = pytest.importorskip("dask")
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
    try:
        yield client
    finally:
        client.close()
        cluster.close()


@pytest.fixture(scope="module")
def client():
    """The cluster every test of a module shares."""
    with _local_client() as client:
        yield client


@pytest.fixture
def own_client():
    """A cluster for one test alone: for tests that kill its workers."""
    with _local_client() as client:
        client.wait_for_workers(2, timeout=60)
        yield client


@pytest.fixture(scope="session")
def probes() -> dict:
    """The probes of every run on the demo model: Conv and Gemm, before and after."""
    return PROBES


@pytest.fixture(scope="session")
def digits():
    return demo.load_test_data()


@pytest.fixture(scope="session")
def reference(digits):
    """Single-process analysis of the whole demo set, raw states kept."""
    x, y = digits
    model = OnnxEfficiencyModel(demo.model_path(), providers="cpu", keep_states=True, **PROBES)
    accuracy = model.evaluate(x, y, batch_size=64)
    return model, accuracy


def _sorted_counts(counter: StateCounter) -> tuple[np.ndarray, np.ndarray]:
    """``counter.result()`` in byte order (the engine may return another order)."""
    ids, counts = counter.result()
    order = np.lexsort(ids.T[::-1]) if ids.shape[1] else np.arange(len(ids))
    return ids[order], counts[order]


ALPHAS = (0, 0.5, 1, 2, 3.5, float("inf"))


def _assert_same_metrics(expected: OnnxEfficiencyModel, got: OnnxEfficiencyModel) -> None:
    """Same totals and metrics to the last bit (every alpha), from the totals a sharded run holds."""
    assert [c.name for c in got.efficiency_layers] == [c.name for c in expected.efficiency_layers]
    for want, have in zip(expected.efficiency_layers, got.efficiency_layers):
        assert have.state_count == want.state_count
        assert have.distinct_count == want.distinct_count
        assert have.n_neurons == want.n_neurons
        for alpha in ALPHAS:
            assert have.entropy(alpha) == want.entropy(alpha), (want.name, alpha)
        assert have.efficiency() == want.efficiency(), want.name
        assert have.efficiency(2, 1) == want.efficiency(2, 1), want.name
    assert network_efficiency(got) == network_efficiency(expected)
    assert aIQ(network_efficiency(got), 0.9, 2) == aIQ(network_efficiency(expected), 0.9, 2)


def _assert_same_counts(expected: OnnxEfficiencyModel, got: OnnxEfficiencyModel) -> None:
    """Same metrics, then the same states and counts (gathered from the cluster)."""
    _assert_same_metrics(expected, got)
    for want, have in zip(expected.efficiency_layers, got.efficiency_layers):
        ids_want, counts_want = _sorted_counts(want.counter)
        ids_have, counts_have = _sorted_counts(have.counter)
        assert np.array_equal(ids_have, ids_want), want.name
        assert np.array_equal(counts_have, counts_want), want.name


def _stored_rows(root: Path, name: str) -> np.ndarray:
    """Every row of the state store of probe ``name`` under the storage path ``root``."""
    return StateStore.open(root / store_dirname(name)).read()


@pytest.fixture(scope="session")
def sorted_counts():
    """``sorted_counts(counter)``: its ids and counts in byte order."""
    return _sorted_counts


@pytest.fixture(scope="session")
def assert_same_counts():
    """``assert_same_counts(expected, got)``: both models counted the same states per probe."""
    return _assert_same_counts


@pytest.fixture(scope="session")
def assert_same_metrics():
    """``assert_same_metrics(expected, got)``: the same totals, entropies (every alpha), efficiencies,
    network efficiency and aIQ, to the last bit."""
    return _assert_same_metrics


@pytest.fixture(scope="session")
def stored_rows():
    """``stored_rows(root, probe_name)``: the rows a run stored for that probe."""
    return _stored_rows


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


@pytest.fixture(scope="session")
def batches():
    """The :class:`Batches` data source class."""
    return Batches
