"""What a shard task runs on a Dask worker.

Each worker process keeps a few models (onnxruntime sessions) per probe
configuration; a task takes an idle one, reads its shard, counts its states
into fresh counters (writing its rows of the raw-state arrays, with storage),
splits them into the run's partitions and returns them as a
:class:`~.reduce._ShardResult`. A task is a pure function of its shard: it
never touches shared state, so a rerun after a lost worker counts nothing
twice.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import onnx

from ..data import n_samples, split_pair
from ..errors import ModelInputError
from ..graph import Probe
from ..runtime import OnnxEfficiencyModel, OnnxProbeCapture
from .build import check_build
from .plan import _sample_shape, _shape_text, _Shard
from .reduce import _ShardInfo, _ShardResult, _split
from .storage import _RegionWriter


@dataclass(frozen=True)
class _Job:
    """Everything a shard task needs besides its data (small: it travels with every task)."""

    model_path: str | None
    model_digest: str
    attach_to: tuple
    exclude: tuple
    method: str
    pack_in_graph: bool
    channel_axes: tuple
    providers: Any
    optimization: str
    threads: int | None
    batch_size: int | None  # None: each worker's model picks its default
    storage: dict | None  # probe name -> (directory, chunk rows, states per instance)
    probe_names: tuple
    n_partitions: int
    build: str  # the client's build_id(): every worker must run the same

    @property
    def cache_key(self) -> tuple:
        return (
            self.model_path, self.model_digest, self.attach_to, self.exclude, self.method,
            self.pack_in_graph, self.channel_axes, str(self.providers), self.optimization,
            self.threads,
        )  # fmt: skip


_CACHE_LOCK = threading.Lock()
_CACHE: "OrderedDict[tuple, list[OnnxEfficiencyModel]]" = OrderedDict()
_CACHE_KEYS = 4  # models (probe configurations) kept per worker process


def _file_key(path: str) -> tuple:
    """The model file as the cache sees it: a rewritten file is a new model."""
    try:
        stat = os.stat(path)
    except OSError:
        return (path, None)
    return (path, stat.st_mtime_ns, stat.st_size)


def _acquire_model(job: _Job, model_bytes: bytes | None) -> tuple[tuple, OnnxEfficiencyModel]:
    """An idle model of this worker process for ``job``, built on first use.

    Each model (and its onnxruntime session) serves one task at a time, so a
    worker with several threads builds one per concurrent task.
    """
    key = job.cache_key + ((_file_key(job.model_path),) if job.model_path else ())
    with _CACHE_LOCK:
        pool = _CACHE.get(key)
        if pool:
            _CACHE.move_to_end(key)
            return key, pool.pop()
    if job.model_path is not None:
        source: Any = job.model_path
    else:
        source = onnx.load_from_string(model_bytes)
    model = OnnxEfficiencyModel(
        source, list(job.attach_to), list(job.exclude), job.method,
        providers=job.providers, optimization=job.optimization,
        pack_in_graph=job.pack_in_graph, channel_axes=dict(job.channel_axes) or None,
        threads=job.threads,
    )  # fmt: skip
    return key, model


def _release_model(key: tuple, model: OnnxEfficiencyModel) -> None:
    """Return ``model`` to this worker's cache (dropping the least recently used configurations)."""
    model.efficiency_layers = []
    with _CACHE_LOCK:
        _CACHE.setdefault(key, []).append(model)
        _CACHE.move_to_end(key)
        while len(_CACHE) > _CACHE_KEYS:
            _CACHE.popitem(last=False)


class _ShardCapture(OnnxProbeCapture):
    """The probe capture of one shard: counts, and writes its rows to the shard's region."""

    def __init__(self, probe: Probe, writer: _RegionWriter | None):
        super().__init__(probe, None, keep_states=False)
        self._writer = writer

    def record_packed(self, packed: np.ndarray, n_neurons: int, instances: int, keep: np.ndarray | None = None) -> None:
        # Sharded runs take no mask (their stores are sized per sample), so ``keep`` is always None.
        super().record_packed(packed, n_neurons, instances, keep)
        if self._writer is not None and self.capture_on:
            self._writer.append(packed)


class _BatchWatch:
    """Wraps the batches of a callable shard: counts samples and checks that shapes agree."""

    def __init__(self, batches: Iterable, where: str):
        self.iterator = iter(batches)
        self.where = where
        self.samples = 0
        self.shape = None
        self.first = next(self.iterator, _BatchWatch)  # sentinel: no batch at all
        self.empty = self.first is _BatchWatch
        self.labelled = (
            not self.empty and isinstance(self.first, (tuple, list)) and len(self.first) == 2
        )

    def __iter__(self) -> Iterator:
        if self.empty:
            return
        item = self.first
        while True:
            inputs, _ = split_pair(item, single_input=True)
            shape = _sample_shape(inputs)
            if self.shape is None:
                self.shape = shape
            elif shape != self.shape:
                raise ModelInputError(
                    f"{self.where} mixes samples of shape {_shape_text(self.shape)} and "
                    f"{_shape_text(shape)}; every sample must have the same shape"
                )
            self.samples += n_samples(inputs)
            yield item
            item = next(self.iterator, _BatchWatch)
            if item is _BatchWatch:
                return


def _load_shard(shard: _Shard, data) -> Any:
    """The shard's samples as an array (or dict of arrays), read by this task itself."""
    if shard.kind == "array":
        return shard.source
    if shard.kind == "dask":
        return data
    if shard.kind == "npy":
        return np.load(shard.source, mmap_mode="r")[shard.start : shard.stop]
    if shard.kind == "zarr":
        import zarr

        array = shard.source
        if isinstance(array, str):
            array = zarr.open_array(array, mode="r")
        return array[shard.start : shard.stop]
    raise AssertionError(shard.kind)


def _with_context(exc: BaseException, where: str) -> BaseException:
    """``exc`` again, of the same type where possible, with ``where`` in front of its message."""
    message = f"{where}: {exc}"
    try:
        new = type(exc)(message)
    except Exception:
        new = RuntimeError(f"{where}: {type(exc).__name__}: {exc}")
    return new


def _run_shard(job: _Job, shard: _Shard, data=None, model_bytes: bytes | None = None) -> _ShardResult:
    """Task: analyze one shard; return its counters split into partitions (pure: a rerun gives the same result)."""
    started = (time.perf_counter(), time.process_time())
    try:
        check_build(job.build, "the worker")
    except Exception as exc:
        raise _with_context(exc, shard.where) from exc
    try:
        key, model = _acquire_model(job, model_bytes)
    except Exception as exc:
        raise _with_context(exc, f"{shard.where}, loading the model on worker pid {os.getpid()}") from exc
    try:
        names = tuple(probe.name for probe in model.probes)
        if names != job.probe_names:
            raise RuntimeError(
                f"the workers' model has probes {list(names)} but the client's has "
                f"{list(job.probe_names)}; the model file differs between client and workers"
            )
        return _analyze_shard(job, shard, data, model, names, started)
    except Exception as exc:
        raise _with_context(exc, shard.where) from exc
    finally:
        _release_model(key, model)


def _analyze_shard(job: _Job, shard: _Shard, data, model: OnnxEfficiencyModel, names, started) -> _ShardResult:
    """Run the shard's samples through ``model`` with fresh captures; its partial result."""
    correct = labelled = 0
    if shard.kind == "callable":
        watch = _BatchWatch(shard.source(shard.index), shard.where)
        if watch.empty:
            if shard.size:
                raise ModelInputError(f"it yielded no batch, {shard.size} samples were declared")
            return _result(job, shard, names, [None] * len(names), 0, 0, 0, None, started)
        writers = _writers(job, shard, model.probes)
        model.efficiency_layers = [_ShardCapture(p, w) for p, w in zip(model.probes, writers)]
        if watch.labelled:
            accuracy = model.evaluate(watch, progress=False)
            labelled = watch.samples
            correct = int(round(accuracy * labelled))
        else:
            model.predict(watch, progress=False)
        n, shape = watch.samples, watch.shape
        if shard.size is not None and n != shard.size:
            raise ModelInputError(f"it yielded {n} samples, {shard.size} were declared in shard_sizes")
    else:
        inputs = _load_shard(shard, data)
        n, shape = n_samples(inputs), _sample_shape(inputs)
        if shard.size is not None and n != shard.size:
            raise ModelInputError(f"it holds {n} samples, {shard.size} were expected")
        writers = _writers(job, shard, model.probes)
        model.efficiency_layers = [_ShardCapture(p, w) for p, w in zip(model.probes, writers)]
        if shard.labels is not None:
            accuracy = model.evaluate(inputs, shard.labels, batch_size=job.batch_size, progress=False)
            labelled = n
            correct = int(round(accuracy * labelled))
        else:
            model.predict(inputs, batch_size=job.batch_size, progress=False)
    for writer in writers:
        if writer is not None:
            writer.close()
    counters = [capture.counter for capture in model.efficiency_layers]
    return _result(job, shard, names, counters, n, correct, labelled, shape, started)


def _result(job: _Job, shard: _Shard, names, counters, n, correct, labelled, shape, started) -> _ShardResult:
    """The shard's facts and its counters split into the run's partitions."""
    for counter in counters:
        if counter is not None:
            counter.n_distinct  # noqa: B018 (finishes the counting: that is not splitting)
    split_started = time.thread_time()  # the split runs in this thread alone
    pieces = _split(counters, shard.index, names, job.n_partitions)
    split_seconds = time.thread_time() - split_started
    ended = time.process_time()
    info = _ShardInfo(
        shard=shard.index, probe_names=names, n_samples=n, correct=correct, labelled=labelled,
        sample_shape=shape, seconds=time.perf_counter() - started[0], cpu_seconds=ended - started[1],
        split_seconds=split_seconds, last_end=time.time(),
    )  # fmt: skip
    return _ShardResult(info, pieces)


def _writers(job: _Job, shard: _Shard, probes) -> list[_RegionWriter | None]:
    """One region writer per probe for this shard's rows (``None`` each without storage)."""
    if not job.storage:
        return [None] * len(probes)
    writers = []
    for probe in probes:
        directory, chunk_rows, per = job.storage[probe.name]
        writers.append(
            _RegionWriter(
                directory, shard.start * per, shard.size * per, chunk_rows,
                f"{shard.where}, probe {probe.name!r}",
            )  # fmt: skip
        )
    return writers


def _identity(value):
    """Task: hold ``value`` on the cluster (the model bytes, sent once for every shard task)."""
    return value
