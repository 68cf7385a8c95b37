"""A sharded run refuses workers that run another build of the library: their
partitions and counters in transit would not fit the others' (wrong counts, not an error)."""

from __future__ import annotations

import pickle
import re
import sys

import numpy as np
import pytest

pytest.importorskip("distributed")

import cloudpickle  # noqa: E402  (installed with distributed)

from tensorstate_onnx import TensorStateError, WorkerBuildError, __version__, demo  # noqa: E402
from tensorstate_onnx.distributed import analyze_sharded, build  # noqa: E402
from tensorstate_onnx.distributed.reduce import _merge_pieces, _settle, _split  # noqa: E402
from tensorstate_onnx.engine import StateCounter  # noqa: E402

# The helpers below run on the workers, which cannot import this file.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

OTHER = "0.0.1+0123456789ab"


def _pretend_build(value):
    """Run on a worker: make its process report ``value`` as its build (None: compute it again)."""
    from tensorstate_onnx.distributed import build as worker_build

    worker_build._build = value


def _piece_of(seed: int):
    counter = StateCounter(40)
    counter.add(np.random.default_rng(seed).integers(0, 256, (300, 5), dtype=np.uint8))
    return _split([counter], seed, ("probe",), 1)[0]


def test_the_build_is_the_version_and_a_digest_of_every_source_file(tmp_path, monkeypatch):
    assert re.fullmatch(re.escape(__version__) + r"\+[0-9a-f]{12}", build.build_id())
    package = tmp_path / "package"
    (package / "engine").mkdir(parents=True)
    (package / "engine" / "hashing.py").write_text("SEED = 1\n")
    (package / "data.bin").write_bytes(b"not source")
    monkeypatch.setattr(build, "_PACKAGE", package)
    ids = []
    for change in (None, "SEED = 2\n", None, "new"):
        if change == "new":
            (package / "engine" / "extra.py").write_text("")
        elif change is not None:
            (package / "engine" / "hashing.py").write_text(change)
        else:
            (package / "data.bin").write_bytes(b"other data")  # not source: the build stays
        monkeypatch.setattr(build, "_build", None)
        ids.append(build.build_id())
    assert ids[0] != ids[1] and ids[1] == ids[2] and ids[3] not in ids[:3]
    assert build.build_id() is build.build_id()  # computed once per process
    monkeypatch.setattr(build, "_PACKAGE", tmp_path / "bytecode_only")
    monkeypatch.setattr(build, "_build", None)
    assert build.build_id() == __version__  # no source to digest: the version alone


def test_another_build_is_refused_with_both_builds_named(monkeypatch):
    build.check_build(build.build_id(), "this process")
    with pytest.raises(WorkerBuildError, match=rf"the worker .*runs tensorstate-onnx {re.escape(build.build_id())}, "
                       rf"but the client runs {re.escape(OTHER)}.*same version") as caught:  # fmt: skip
        build.check_build(OTHER, "the worker")
    assert isinstance(caught.value, TensorStateError) and isinstance(caught.value, RuntimeError)


def test_a_piece_sent_by_another_build_is_refused_by_the_task_using_it(monkeypatch):
    """Arriving, its counters are not read and nothing raises (Dask would retry a transfer
    that fails forever); merging or settling it raises, naming both builds."""
    piece = _piece_of(3)
    monkeypatch.setattr(build, "_build", OTHER)
    sent = pickle.dumps(piece)
    monkeypatch.setattr(build, "_build", None)
    arrived = pickle.loads(sent)
    assert isinstance(arrived.arrival_error, WorkerBuildError) and arrived.counters == [None]
    message = rf"received partition 0 of shards \[3\].*but the worker that sent it runs {re.escape(OTHER)}"
    with pytest.raises(WorkerBuildError, match=message):
        _merge_pieces(0, 1, _piece_of(4), arrived)
    with pytest.raises(WorkerBuildError, match=message):
        _settle(arrived)
    with pytest.raises(WorkerBuildError, match=message):  # sent on again, it stays refused
        _settle(pickle.loads(pickle.dumps(arrived)))
    monkeypatch.setattr(build, "_build", OTHER)
    same = pickle.loads(sent)
    assert same.arrival_error is None and same.counters[0].total == 300  # the same build reads it
    same.check()


def test_a_piece_that_arrives_broken_fails_the_task_using_it():
    """Not while Dask deserializes it (which would retry the transfer forever)."""
    counter = StateCounter(200)
    counter.add(np.random.default_rng(6).integers(0, 256, (300, 25), dtype=np.uint8))
    function, fields = _split([counter], 6, ("probe",), 1)[0].__reduce__()
    (n_neurons, total, tuning, kind, (hashes, refs, counts, words)), = fields[5]
    broken = (n_neurons, total, tuning, kind, (hashes, refs, counts, words[:1]))  # states without their words
    arrived = function(*fields[:5], [broken], *fields[6:])
    assert arrived.counters == [None]
    with pytest.raises(Exception, match="inconsistent") as caught:
        _settle(arrived)
    assert not isinstance(caught.value, TensorStateError)  # not a user's mistake: it looks like a bug


@pytest.mark.distributed
def test_a_worker_of_another_build_fails_the_run_naming_the_shard(own_client, digits, probes):
    x, y = digits
    workers = sorted(own_client.scheduler_info()["workers"])
    try:
        own_client.run(_pretend_build, OTHER, workers=workers[1:])
        with pytest.raises(WorkerBuildError, match=rf"shard \d+ .*runs tensorstate-onnx {re.escape(OTHER)}, but the client runs"):
            analyze_sharded(demo.model_path(), x, labels=y, client=own_client, shard_size=30, **probes)
        # A worker that runs no shard still refuses the pieces other workers send it.
        piece = own_client.submit(_piece_of, 5, workers=workers[:1], pure=False)
        merged = own_client.submit(_merge_pieces, 0, 1, piece, workers=workers[1:], allow_other_workers=False, pure=False)
        with pytest.raises(WorkerBuildError, match=rf"received partition 0 of shards \[5\] .*runs tensorstate-onnx {re.escape(OTHER)}"):
            merged.result(timeout=60)
    finally:
        own_client.run(_pretend_build, None)
