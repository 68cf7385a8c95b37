"""Sharded, distributed analysis of an ONNX model on Dask.

:func:`analyze_sharded` splits a dataset into shards, runs every shard in its
own Dask task (one onnxruntime session per worker process, cached), and
tree-reduces the per-probe :class:`~tensorstate_onnx.engine.StateCounter` of
every shard into an :class:`~tensorstate_onnx.runtime.OnnxEfficiencyModel`
built locally. The counts are exactly those of a single-process
``OnnxEfficiencyModel.predict``/``evaluate`` over the whole data.

Exactly once
    A shard task is a pure function of its shard: it returns fresh counters
    and never touches shared state, so Dask may run it again (after a worker
    died) without anything being counted twice. Merge tasks are pure too:
    they build new counters from their inputs and never modify them. The
    reduction is a static tree of task keys built before the run: every
    shard's result is the input of exactly one merge task (or is itself a
    root), and every root is merged into the local model exactly once, by the
    client, as it completes. Dask keeps one result per task key; a retried
    task replaces a lost result, it never adds to one.

Reduction
    Merge tasks combine ``merge_fan_in`` consecutive partial results, level
    by level, until at most ``merge_roots`` remain (default 32, or the number
    of workers if larger); the client merges those itself as they complete,
    overlapping the rest of the run. So small runs send each shard's counters
    straight to the client (one transfer per state, no extra merge pass),
    and large runs are tree-reduced on the workers first.

Raw states
    With ``storage_path`` the client creates one zarr array per probe, sized
    for the whole data (``samples * states_per_instance`` rows) with chunks
    that hold whole samples and divide every shard boundary, so each shard
    task writes its own rows ``[start * spi, stop * spi)`` in whole chunks
    that no other task touches. A retried shard rewrites the same region with
    the same bytes. The arrays reopen with :meth:`StateStore.open
    <tensorstate_onnx.store.StateStore.open>` and hold rows in dataset order;
    after a failed run they stay readable, rows of unfinished shards read as
    zeros, and the attributes ``complete`` and ``shards_written`` say which
    shards are there.

``dask[distributed]`` is an optional dependency, imported only here and only
when a function of this module is called.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import threading
import time
import uuid
import warnings
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import onnx

from .data import DEFAULT_BATCH_SIZE
from .engine import StateCounter, n_bytes_for
from ._optional import import_optional
from .errors import ModelInputError, ProviderError, SchedulerConnectionError, ShardFailedError
from .graph import Probe
from .runtime import OnnxEfficiencyModel, OnnxProbeCapture
from .store import STATE_CHUNK_BYTES, StateStore, check_storage_root, state_codec, store_dirname

__all__ = [
    "ShardedAnalysis",
    "ShardFailedError",
    "SchedulerConnectionError",
    "analyze_sharded",
    "analyze_cli",
]

log = logging.getLogger(__name__)

_CLIENT_ROOTS = 32  # default: the client merges up to this many partials itself
_MERGES_QUEUED = 2  # root results fetched but not yet merged, at most
_MAX_PROTO_BYTES = 1 << 30  # larger ModelProtos must be given as a path on shared storage
_SHARD_KEY = re.compile(r"tensorstate-shard-(\d+)-")


def _dask():
    """Import dask and dask.distributed, or explain how to install them."""
    return tuple(import_optional(name, "distributed", "distributed analysis") for name in ("dask", "distributed"))


# =========================================================================== results


@dataclass
class ShardedAnalysis:
    """The outcome of :func:`analyze_sharded`.

    ``model`` is a locally built :class:`OnnxEfficiencyModel` whose
    ``efficiency_layers`` hold the merged counts (it never ran the data);
    ``accuracy`` is the accuracy of the first output, or ``None`` without
    labels. Unpacks as ``model, accuracy = analyze_sharded(...)``.
    ``stats`` holds timings: per-shard and per-merge task seconds on the
    workers, the client's merge seconds, the wall time, and the time from
    the end of the last shard to the end of the run (``tail_seconds``).
    """

    model: OnnxEfficiencyModel
    accuracy: float | None
    n_samples: int
    n_shards: int
    storage_path: Path | None = None
    stats: dict = field(default_factory=dict)

    def __iter__(self):
        return iter((self.model, self.accuracy))


# =========================================================================== shards


@dataclass(frozen=True)
class _Shard:
    """One shard: where its samples lie and how a task reads them.

    ``kind`` is ``"array"`` (``source`` is the data, already sliced),
    ``"npy"`` (``source`` is a path), ``"zarr"`` (an array object or a
    path), ``"dask"`` (the data comes as a task argument) or ``"callable"``
    (``source(index)`` yields batches).
    """

    index: int
    start: int | None
    stop: int | None
    kind: str
    source: Any = None
    labels: np.ndarray | None = None

    @property
    def size(self) -> int | None:
        return None if self.start is None else self.stop - self.start

    @property
    def where(self) -> str:
        span = "" if self.start is None else f" (samples {self.start}..{self.stop - 1})"
        return f"shard {self.index}{span}"


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
    batch_size: int
    storage: dict | None  # probe name -> (directory, chunk rows, states per instance)
    probe_names: tuple

    @property
    def cache_key(self) -> tuple:
        return (
            self.model_path, self.model_digest, self.attach_to, self.exclude, self.method,
            self.pack_in_graph, self.channel_axes, str(self.providers), self.optimization,
            self.threads,
        )  # fmt: skip


@dataclass
class _Partial:
    """Merged counts of a set of shards (what shard and merge tasks return)."""

    shards: list[int]
    probe_names: tuple
    counters: list[StateCounter | None]
    n_samples: int
    correct: int
    labelled: int
    sample_shape: Any  # per-sample input shape(s), None when no sample was seen
    shape_shard: int | None  # the shard that showed ``sample_shape`` first
    shard_seconds: list[float]
    merge_seconds: list[float]
    last_end: float  # time.time() when the last of these shards finished
    merge_units: list[int] = field(default_factory=list)  # shards covered by each merge task's output

    def __sizeof__(self) -> int:
        # What Dask's memory accounting sees (it calls sys.getsizeof on results).
        held = sum(getattr(c, "nbytes", 0) for c in self.counters if c is not None)
        return object.__sizeof__(self) + int(held)


# =========================================================================== worker side

_CACHE_LOCK = threading.Lock()
_CACHE: "OrderedDict[tuple, list[OnnxEfficiencyModel]]" = OrderedDict()
_CACHE_KEYS = 4  # models (probe configurations) kept per worker process


def _file_key(path: str) -> tuple:
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
    model.efficiency_layers = []
    with _CACHE_LOCK:
        _CACHE.setdefault(key, []).append(model)
        _CACHE.move_to_end(key)
        while len(_CACHE) > _CACHE_KEYS:
            _CACHE.popitem(last=False)


class _RegionWriter:
    """Writes one shard's rows of one probe into its region of the shared zarr array.

    The region starts on a chunk boundary and (unless it is the last region)
    ends on one, so whole chunks are written and no other task writes them.
    """

    def __init__(self, path: str, start_row: int, n_rows: int, chunk_rows: int, where: str):
        import zarr

        self.array = zarr.open_array(zarr.storage.LocalStore(path), mode="r+")
        self.start = start_row
        self.n_rows = n_rows
        self.chunk_rows = chunk_rows
        self.where = where
        self.written = 0
        self.pending: list[np.ndarray] = []
        self.pending_rows = 0

    def append(self, packed: np.ndarray) -> None:
        if self.written + self.pending_rows + packed.shape[0] > self.n_rows:
            raise ValueError(
                f"{self.where} produced more than the {self.n_rows} states expected for "
                f"{self.array.store}; its samples do not have the shape the storage was sized for"
            )
        self.pending.append(np.ascontiguousarray(packed))
        self.pending_rows += packed.shape[0]
        if self.pending_rows >= self.chunk_rows:
            data = np.concatenate(self.pending)
            whole = data.shape[0] // self.chunk_rows * self.chunk_rows
            self._write(data[:whole])
            rest = data[whole:]
            self.pending = [rest] if rest.shape[0] else []
            self.pending_rows = rest.shape[0]

    def _write(self, data: np.ndarray) -> None:
        if data.shape[0]:
            begin = self.start + self.written
            self.array[begin : begin + data.shape[0]] = data
            self.written += data.shape[0]

    def close(self) -> None:
        if self.pending:
            self._write(np.concatenate(self.pending))
            self.pending, self.pending_rows = [], 0
        if self.written != self.n_rows:
            raise ValueError(
                f"{self.where} produced {self.written} states for {self.array.store}, "
                f"{self.n_rows} were expected"
            )


class _ShardCapture(OnnxProbeCapture):
    """The probe capture of one shard: counts, and writes its rows to the shard's region."""

    def __init__(self, probe: Probe, writer: _RegionWriter | None):
        super().__init__(probe, None, keep_states=False)
        self._writer = writer

    def record_packed(self, packed: np.ndarray, n_neurons: int, instances: int) -> None:
        super().record_packed(packed, n_neurons, instances)
        if self._writer is not None and self.capture_on:
            self._writer.append(packed)


def _sample_shape(inputs) -> Any:
    if isinstance(inputs, dict):
        return tuple(sorted((name, tuple(np.shape(value)[1:])) for name, value in inputs.items()))
    return tuple(getattr(inputs, "shape", np.shape(inputs))[1:])


def _n_samples(inputs) -> int:
    if isinstance(inputs, dict):
        return len(next(iter(inputs.values())))
    shape = getattr(inputs, "shape", None)
    return int(shape[0]) if shape else len(inputs)


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
            inputs = item[0] if isinstance(item, (tuple, list)) and len(item) == 2 else item
            shape = _sample_shape(inputs)
            if self.shape is None:
                self.shape = shape
            elif shape != self.shape:
                raise ModelInputError(
                    f"{self.where} mixes samples of shape {_shape_text(self.shape)} and "
                    f"{_shape_text(shape)}; every sample must have the same shape"
                )
            self.samples += _n_samples(inputs)
            yield item
            item = next(self.iterator, _BatchWatch)
            if item is _BatchWatch:
                return


def _shape_text(shape) -> str:
    if shape and isinstance(shape[0], tuple):
        return "{" + ", ".join(f"{name!r}: {tuple(dims)}" for name, dims in shape) + "}"
    return str(tuple(shape))


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


def _run_shard(job: _Job, shard: _Shard, data=None, model_bytes: bytes | None = None) -> _Partial:
    """Task: analyze one shard; return its counters (pure: a rerun gives the same result)."""
    started = time.perf_counter()
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


def _analyze_shard(job: _Job, shard: _Shard, data, model: OnnxEfficiencyModel, names, started) -> _Partial:
    correct = labelled = 0
    if shard.kind == "callable":
        watch = _BatchWatch(shard.source(shard.index), shard.where)
        if watch.empty:
            if shard.size:
                raise ModelInputError(f"it yielded no batch, {shard.size} samples were declared")
            return _empty_partial(shard, names, started)
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
        n, shape = _n_samples(inputs), _sample_shape(inputs)
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
    return _Partial(
        shards=[shard.index], probe_names=names, counters=counters, n_samples=n,
        correct=correct, labelled=labelled, sample_shape=shape, shape_shard=shard.index,
        shard_seconds=[time.perf_counter() - started], merge_seconds=[], last_end=time.time(),
    )  # fmt: skip


def _empty_partial(shard: _Shard, names, started) -> _Partial:
    return _Partial(
        shards=[shard.index], probe_names=names, counters=[None] * len(names), n_samples=0,
        correct=0, labelled=0, sample_shape=None, shape_shard=None,
        shard_seconds=[time.perf_counter() - started], merge_seconds=[], last_end=time.time(),
    )  # fmt: skip


def _writers(job: _Job, shard: _Shard, probes) -> list[_RegionWriter | None]:
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


def _check_same_shape(a: _Partial, b: _Partial) -> None:
    if a.sample_shape is not None and b.sample_shape is not None and a.sample_shape != b.sample_shape:
        raise ModelInputError(
            f"shard {b.shape_shard} has samples of shape {_shape_text(b.sample_shape)} but shard "
            f"{a.shape_shard} has {_shape_text(a.sample_shape)}; every shard must hold samples "
            "of the same shape"
        )


def _merge_partials(*parts: _Partial) -> _Partial:
    """Task: combine partial results into new counters (inputs are never modified)."""
    started = time.perf_counter()
    first = parts[0]
    shape_owner = first
    for part in parts[1:]:
        if part.probe_names != first.probe_names:
            raise RuntimeError(
                f"shards {first.shards} and {part.shards} probed different tensors; the model "
                "file differs between workers"
            )
        if shape_owner.sample_shape is None:
            shape_owner = part
        else:
            _check_same_shape(shape_owner, part)
    counters: list[StateCounter | None] = []
    for i in range(len(first.probe_names)):
        present = [part.counters[i] for part in parts if part.counters[i] is not None]
        if len(present) <= 1:
            counters.append(present[0] if present else None)
            continue
        merged = StateCounter(present[0].n_neurons)
        for counter in present:
            merged.merge(counter)
        counters.append(merged)
    return _Partial(
        shards=sorted(s for part in parts for s in part.shards),
        probe_names=first.probe_names,
        counters=counters,
        n_samples=sum(part.n_samples for part in parts),
        correct=sum(part.correct for part in parts),
        labelled=sum(part.labelled for part in parts),
        sample_shape=shape_owner.sample_shape,
        shape_shard=shape_owner.shape_shard,
        shard_seconds=[s for part in parts for s in part.shard_seconds],
        merge_seconds=[s for part in parts for s in part.merge_seconds] + [time.perf_counter() - started],
        last_end=max(part.last_end for part in parts),
        merge_units=[u for part in parts for u in part.merge_units] + [sum(len(part.shards) for part in parts)],
    )


def _identity(value):
    return value


# =========================================================================== client side


def _as_tuple(names) -> tuple:
    if names is None:
        return ()
    if isinstance(names, str):
        return (names,)
    return tuple(names)


def _is_dask_array(data) -> bool:
    return type(data).__module__.startswith("dask.array") and hasattr(data, "chunks")


def _is_zarr_array(data) -> bool:
    return type(data).__module__.startswith("zarr") and hasattr(data, "store") and hasattr(data, "shape")


def _default_shard_size(n: int, n_workers: int, batch_size: int) -> int:
    size = max(1, math.ceil(n / (4 * max(1, n_workers))))
    if size > batch_size:
        size = math.ceil(size / batch_size) * batch_size
    return min(size, max(4096, 4 * batch_size))


def _check_count(value, what: str, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _local_labels(labels, n: int) -> np.ndarray | None:
    if labels is None:
        return None
    if _is_dask_array(labels):
        labels = labels.compute()
    labels = np.asarray(labels)
    if labels.ndim == 0 or labels.shape[0] != n:
        got = "a scalar" if labels.ndim == 0 else f"{labels.shape[0]} labels"
        raise ModelInputError(f"got {got} for {n} samples; give one label per sample")
    return labels


def _plan_shards(data, labels, shard_size, n_shards, shard_sizes, n_workers, batch_size):
    """Split ``data`` into shards. Returns ``(shards, dask_blocks, total or None, sample shape)``."""
    if isinstance(data, tuple) and len(data) == 2 and not callable(data[0]):
        if labels is not None:
            raise ModelInputError("labels were given twice: inside (x, y) data and as labels=")
        data, labels = data
    if isinstance(data, (str, os.PathLike)):
        return _plan_path(Path(data), labels, shard_size, n_workers, batch_size)
    if callable(data) and not hasattr(data, "shape"):
        return _plan_callable(data, labels, n_shards, shard_sizes)
    if n_shards is not None or shard_sizes is not None:
        raise ValueError("n_shards and shard_sizes are for callable data sources; give shard_size for arrays")
    if _is_dask_array(data):
        return _plan_dask(data, labels, shard_size)
    if isinstance(data, dict):
        if not data:
            raise ModelInputError("the input dict is empty; map each model input name to an array")
        lengths = {name: len(value) for name, value in data.items()}
        if len(set(lengths.values())) != 1:
            raise ModelInputError(f"inputs have different numbers of samples: {lengths}")
        n = next(iter(lengths.values()))
        shape = _sample_shape(data)
    elif hasattr(data, "shape") and hasattr(data, "__getitem__"):
        if not data.shape:
            raise ModelInputError("data must have a batch axis; got a scalar")
        n, shape = int(data.shape[0]), tuple(data.shape[1:])
    else:
        raise TypeError(
            f"cannot shard {type(data).__name__}; pass a numpy, dask or zarr array, a path of a "
            ".npy file or zarr array, or a callable shard_index -> iterable of batches with n_shards"
        )
    if n == 0:
        raise ModelInputError("the data holds no samples")
    labels = _local_labels(labels, n)
    size = shard_size or _default_shard_size(n, n_workers, batch_size)
    shards = []
    remote_zarr = _is_zarr_array(data) and type(data.store).__name__ != "MemoryStore"
    for index, start in enumerate(range(0, n, size)):
        stop = min(n, start + size)
        shard_labels = None if labels is None else labels[start:stop]
        if remote_zarr:  # each task opens and slices the array itself
            shards.append(_Shard(index, start, stop, "zarr", data, shard_labels))
        else:
            if isinstance(data, dict):
                part = {name: np.asarray(value[start:stop]) for name, value in data.items()}
            else:
                part = np.asarray(data[start:stop])
            shards.append(_Shard(index, start, stop, "array", part, shard_labels))
    return shards, None, n, shape


def _plan_path(path: Path, labels, shard_size, n_workers, batch_size):
    path = path.absolute()
    if path.is_dir():
        import zarr

        try:
            array = zarr.open_array(str(path), mode="r")
        except Exception as exc:
            raise ModelInputError(f"{path} is a directory but not a zarr array ({exc})") from None
        kind = "zarr"
    elif path.is_file():
        try:
            array = np.load(path, mmap_mode="r")
        except Exception as exc:
            raise ModelInputError(
                f"{path} is not a readable .npy file ({exc}); pass a .npy file or a zarr array directory"
            ) from None
        if not isinstance(array, np.ndarray):
            raise ModelInputError(
                f"{path} is not a single-array .npy file; load .npz archives first and pass their arrays"
            )
        kind = "npy"
    else:
        raise ModelInputError(f"data path {path} does not exist")
    if not array.shape:
        raise ModelInputError(f"{path} holds a scalar, not samples")
    n = int(array.shape[0])
    if n == 0:
        raise ModelInputError(f"{path} holds no samples")
    labels = _local_labels(labels, n)
    size = shard_size or _default_shard_size(n, n_workers, batch_size)
    shards = [
        _Shard(i, start, min(n, start + size), kind, str(path),
               None if labels is None else labels[start : min(n, start + size)])
        for i, start in enumerate(range(0, n, size))
    ]  # fmt: skip
    return shards, None, n, tuple(array.shape[1:])


def _plan_callable(function, labels, n_shards, shard_sizes):
    if labels is not None:
        raise ModelInputError(
            "labels= cannot be split for a callable data source; let it yield (x, y) batches"
        )
    if shard_sizes is not None:
        sizes = [int(s) for s in shard_sizes]
        if any(s < 0 for s in sizes):
            raise ValueError(f"shard_sizes must not be negative, got {list(shard_sizes)}")
        if n_shards is not None and n_shards != len(sizes):
            raise ValueError(f"n_shards={n_shards} but shard_sizes has {len(sizes)} entries")
        if sum(sizes) == 0:
            raise ModelInputError("the data holds no samples (every shard size is 0)")
        starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        shards = [_Shard(i, starts[i], starts[i + 1], "callable", function) for i in range(len(sizes))]
        return shards, None, int(starts[-1]), None
    if n_shards is None:
        raise ValueError("a callable data source needs n_shards (or shard_sizes): how many shards to ask it for")
    if isinstance(n_shards, bool) or not isinstance(n_shards, (int, np.integer)) or n_shards < 0:
        raise ValueError(f"n_shards must be a non-negative int, got {n_shards!r}")
    if n_shards == 0:
        raise ModelInputError("the data holds no samples (n_shards=0)")
    return [_Shard(i, None, None, "callable", function) for i in range(int(n_shards))], None, None, None


def _plan_dask(data, labels, shard_size):
    if data.ndim == 0:
        raise ModelInputError("data must have a batch axis; got a scalar")
    if data.ndim > 1:
        data = data.rechunk({axis: -1 for axis in range(1, data.ndim)})
    if shard_size:
        data = data.rechunk({0: shard_size})
    if any(isinstance(size, float) and math.isnan(size) for size in data.chunks[0]):
        raise ModelInputError("the dask array has unknown chunk sizes; call compute_chunk_sizes() first")
    n = int(data.shape[0])
    if n == 0:
        raise ModelInputError("the data holds no samples")
    labels = _local_labels(labels, n)
    blocks = data.to_delayed().reshape(-1)
    shards, delayed = [], []
    start = 0
    for size, block in zip(data.chunks[0], blocks):
        if size:
            stop = start + size
            shards.append(
                _Shard(len(shards), start, stop, "dask", None, None if labels is None else labels[start:stop])
            )
            delayed.append(block)
            start = stop
    return shards, delayed, n, tuple(data.shape[1:])


def _states_per_instance(probe: Probe) -> int | None:
    shape = probe.shape
    if shape is None or len(shape) < 2 or probe.channel_axis % len(shape) == 0:
        return None
    axis = probe.channel_axis % len(shape)
    dims = [d for i, d in enumerate(shape) if i not in (0, axis)]
    if any(not isinstance(d, (int, np.integer)) or d is None for d in dims):
        return None
    return int(np.prod(dims, dtype=np.int64))


def _largest_divisor_at_most(value: int, cap: int) -> int:
    """The largest divisor of ``value`` that is <= ``cap`` (at least 1)."""
    if value <= cap:
        return value
    best = 1
    for d in range(1, math.isqrt(value) + 1):
        if value % d == 0:
            if d <= cap:
                best = max(best, d)
            if value // d <= cap:
                best = max(best, value // d)
    return best


def _create_stores(root: Path, local: OnnxEfficiencyModel, shards: list[_Shard], n: int, overwrite: bool) -> dict:
    """Pre-size one zarr array per probe; return the job's storage map."""
    import zarr

    missing = [s.where for s in shards if s.start is None]
    if missing:
        raise ValueError(
            "storage needs the size of every shard before the run; give shard_sizes= with a "
            "callable data source"
        )
    plan = {}
    for capture in local.efficiency_layers:
        probe = capture.probe
        per = _states_per_instance(probe)
        neurons = probe.n_neurons
        if per is None or not neurons:
            raise ValueError(
                f"storage needs a static number of states per sample and of neurons; probe "
                f"{probe.name!r} has shape {probe.shape} (channel axis {probe.channel_axis}). "
                "Give the model static spatial dimensions or run without storage_path"
            )
        plan[probe.name] = (capture, per, int(neurons))
    boundaries = 0
    for shard in shards[1:]:
        boundaries = math.gcd(boundaries, shard.start)
    storage = {}
    codec = state_codec()
    for name, (capture, per, neurons) in plan.items():
        n_bytes = n_bytes_for(neurons)
        cap = max(1, STATE_CHUNK_BYTES // (per * n_bytes))
        samples_per_chunk = _largest_divisor_at_most(boundaries, cap) if boundaries else min(n, cap)
        chunk_rows = samples_per_chunk * per
        directory = root / store_dirname(name)
        attributes = {
            "n_neurons": neurons, "name": name, **capture.metadata, "states_per_instance": per,
            "n_samples": n, "n_shards": len(shards), "complete": False, "shards_written": [],
        }  # fmt: skip
        zarr.create_array(
            zarr.storage.LocalStore(directory), shape=(n * per, n_bytes), chunks=(chunk_rows, n_bytes),
            dtype="uint8", compressors=[codec], attributes=attributes, fill_value=0,
            overwrite=overwrite,
        )  # fmt: skip
        storage[name] = (str(directory), chunk_rows, per)
    return storage


def _mark_stores(storage: dict | None, written: Iterable[int], complete: bool) -> None:
    if not storage:
        return
    import zarr

    for directory, _, _ in storage.values():
        try:
            array = zarr.open_array(zarr.storage.LocalStore(directory), mode="r+")
            array.update_attributes({"complete": complete, "shards_written": sorted(written)})
        except Exception as exc:  # never hide the run's own error behind this one
            log.warning("could not update the attributes of %s: %s", directory, exc)


def _attach_stores(local: OnnxEfficiencyModel, storage: dict, n: int) -> None:
    """Let the local captures read the stored states (``states``, ``counts(index=...)``)."""
    for capture in local.efficiency_layers:
        directory, _, per = storage[capture.name]
        store = StateStore.open(directory)
        capture.attach_store(store, instances=n, states_per_instance=per)


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


@contextmanager
def _connect(client, scheduler, n_workers, threads_per_worker, timeout):
    """Yield ``(client, n_workers)``: the given client, one for ``scheduler``, or a new LocalCluster."""
    _, distributed = _dask()
    if client is not None:
        yield client
        return
    if scheduler is not None:
        try:
            own = distributed.Client(scheduler, timeout=timeout, set_as_default=False)
        except Exception as exc:
            raise SchedulerConnectionError(
                f"could not connect to the Dask scheduler at {scheduler!r} within {timeout} s "
                f"({type(exc).__name__}: {exc}); check the address and that the scheduler is running"
            ) from None
        try:
            yield own
        finally:
            own.close()
        return
    workers = n_workers or _cpu_count()
    cluster = distributed.LocalCluster(
        n_workers=workers, threads_per_worker=threads_per_worker, processes=True,
        dashboard_address=":0", silence_logs=logging.ERROR,
    )  # fmt: skip
    try:
        own = distributed.Client(cluster, set_as_default=False)
        try:
            yield own
        finally:
            own.close()
    finally:
        cluster.close()


def _n_workers(client, timeout) -> int:
    try:
        client.wait_for_workers(1, timeout=timeout)
    except Exception as exc:
        raise SchedulerConnectionError(
            f"the Dask scheduler at {client.scheduler.address} has no workers (waited {timeout} s: {exc}); "
            "start workers with `dask worker ADDRESS`"
        ) from None
    return max(1, len(client.nthreads()))


def _build_tree(client, leaves: list, fan_in: int, roots: int, token: str) -> list:
    """Merge tasks over consecutive leaves, level by level, until at most ``roots`` remain."""
    level, depth = list(leaves), 0
    while len(level) > max(1, roots):
        depth += 1
        nxt = []
        for j in range(0, len(level), fan_in):
            group = level[j : j + fan_in]
            if len(group) == 1:
                nxt.append(group[0])
            else:
                nxt.append(
                    client.submit(
                        _merge_partials, *group, key=f"tensorstate-merge-{depth}-{j // fan_in}-{token}",
                        pure=False, priority=depth,
                    )
                )  # fmt: skip
        level = nxt
    return level


def _build_local_model(model, attach_to, exclude, method, providers, optimization, pack_in_graph, channel_axes):
    kwargs = dict(optimization=optimization, pack_in_graph=pack_in_graph, channel_axes=channel_axes)
    try:
        return OnnxEfficiencyModel(model, attach_to, exclude, method, providers=providers, **kwargs)
    except ProviderError:
        # The client only holds the results; the workers may have providers it lacks.
        return OnnxEfficiencyModel(model, attach_to, exclude, method, providers="cpu", **kwargs)


def _failure(exc: BaseException, shard_where: dict, n_done: int, n_shards: int, storage_path) -> BaseException:
    """A clear exception for a failed run (KilledWorker becomes ShardFailedError)."""
    _, distributed = _dask()
    killed = getattr(distributed, "KilledWorker", None)
    if killed is None:
        from distributed.scheduler import KilledWorker as killed
    if isinstance(exc, killed):
        key = str(exc.task)
        match = _SHARD_KEY.search(key)
        what = shard_where.get(int(match.group(1)), f"shard {match.group(1)}") if match else f"task {key!r}"
        stored = (
            f" The {n_done} finished shards are in {storage_path} (attribute 'shards_written'); "
            "rows of the others read as zeros." if storage_path is not None else ""
        )
        return ShardFailedError(
            f"{what} killed {exc.allowed_failures + 1} worker processes and was given up after "
            f"Dask's retry limit (distributed.scheduler.allowed-failures={exc.allowed_failures}); "
            f"{n_done} of {n_shards} shards had finished. It crashes the worker every time "
            "(out of memory, a native crash, os._exit in a data source?): check the worker "
            f"logs and that shard's data.{stored}"
        )
    return exc


def analyze_sharded(
    model: onnx.ModelProto | str | os.PathLike,
    data,
    attach_to,
    exclude=(),
    method: str = "after",
    *,
    labels=None,
    shard_size: int | None = None,
    n_shards: int | None = None,
    shard_sizes: Sequence[int] | None = None,
    batch_size: int | None = None,
    client=None,
    n_workers: int | None = None,
    scheduler: str | None = None,
    storage_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    pack_in_graph: bool = False,
    channel_axes: dict | None = None,
    providers="cpu",
    optimization: str = "all",
    threads_per_worker: int = 1,
    timeout: float = 30.0,
    worker_model_path: str | os.PathLike | None = None,
    merge_fan_in: int = 2,
    merge_roots: int | None = None,
) -> ShardedAnalysis:
    """Analyze ``data`` shard by shard on a Dask cluster; same counts as one process.

    Args:
        model: path of an ``.onnx`` file that the workers can read (shared
            storage), or a ``ModelProto`` (sent to the workers as bytes; up
            to 1 GiB).
        data: what to shard —

            * a numpy array (or a dict of arrays, one per model input, or an
              ``(x, y)`` pair): split every ``shard_size`` samples; each
              slice travels inside its task;
            * a dask array: one shard per chunk along axis 0 (rechunked to
              ``shard_size`` if given); blocks are computed on the workers;
            * a zarr array on a directory store, or the path of a ``.npy``
              file or zarr array directory on shared storage: each task opens
              it and reads its own slice;
            * a callable ``shard_index -> iterable of batches`` (arrays or
              ``(x, y)`` pairs) with ``n_shards``; give ``shard_sizes`` too
              for storage. It runs on the workers, so it must be picklable.
        attach_to, exclude, method, pack_in_graph, channel_axes: the probes,
            as for :class:`OnnxEfficiencyModel`.
        labels: class labels, one per sample (array sources), for accuracy.
        shard_size: samples per shard (default: about four shards per
            worker, a multiple of ``batch_size``).
        batch_size: samples per onnxruntime run inside a shard (default 256).
        client, scheduler, n_workers: run on this ``distributed.Client``, or
            connect to the scheduler at this address (``"tcp://host:8786"``),
            or else start a ``LocalCluster`` of ``n_workers`` processes
            (default: one per core) that is closed afterwards.
        storage_path: directory for one zarr array of raw states per probe,
            written region by region by the shards; must not exist (or be
            empty) unless ``overwrite``.
        providers, optimization: onnxruntime settings of the workers' sessions.
        threads_per_worker: worker threads of a LocalCluster started here and
            onnxruntime intra-op threads of every session.
        timeout: seconds to wait for the scheduler and for a first worker.
        worker_model_path: where the workers find the model file, if their
            shared storage is mounted elsewhere than the client's.
        merge_fan_in: inputs per merge task of the reduction tree.
        merge_roots: merge tasks on the workers combine consecutive shards
            (``merge_fan_in`` at a time, level by level) until at most this
            many partial results remain; the client merges each of those into
            the result as soon as it completes. Default: 32 or the number of
            workers if larger, so up to 32 shards go straight to the client
            (one transfer, no extra merge pass: best when states rarely repeat
            across shards, as in wide layers), and more shards are first
            tree-reduced on the workers. ``merge_roots=1`` reduces everything
            on the workers.

    Returns:
        :class:`ShardedAnalysis` (``model, accuracy = analyze_sharded(...)``).

    Raises:
        ImportError without dask.distributed; ModelFileError for a model the
        client or the workers cannot read; ModelInputError for empty data,
        labels that do not fit, or shards whose samples differ in shape (the
        message names the shard); SchedulerConnectionError when the scheduler
        cannot be reached within ``timeout`` or has no workers;
        ShardFailedError when a shard kills its worker more often than
        ``distributed.scheduler.allowed-failures`` allows; StorageExistsError
        for an existing storage path.
    """
    dask, distributed = _dask()
    batch_size = _check_count(batch_size, "batch_size") or DEFAULT_BATCH_SIZE
    shard_size = _check_count(shard_size, "shard_size")
    fan_in = _check_count(merge_fan_in, "merge_fan_in", allow_none=False)
    if fan_in < 2:
        raise ValueError(f"merge_fan_in must be at least 2, got {merge_fan_in}")
    _check_count(threads_per_worker, "threads_per_worker", allow_none=False)
    _check_count(n_workers, "n_workers")
    if client is not None and scheduler is not None:
        raise ValueError("give either client= or scheduler=, not both")

    # The model: the client builds its own copy (probes, validation) and tells
    # the workers where to find theirs.
    if isinstance(model, onnx.ModelProto):
        if worker_model_path is not None:
            model_path, model_bytes = str(Path(worker_model_path).absolute()), None
        else:
            if model.ByteSize() > _MAX_PROTO_BYTES:
                raise ValueError(
                    "the ModelProto is too large to send to the workers; save it to shared storage "
                    "(tensorstate_onnx.graph.save_model) and pass its path"
                )
            model_path, model_bytes = None, model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        model_path, model_bytes = str(Path(worker_model_path or model).absolute()), None
        model = Path(model).absolute()
    else:
        raise TypeError(f"model must be an onnx.ModelProto or a path to an .onnx file, not {type(model).__name__}")
    local = _build_local_model(model, attach_to, exclude, method, providers, optimization, pack_in_graph, channel_axes)
    digest = hashlib.sha256(model_bytes).hexdigest() if model_bytes is not None else ""
    started = time.perf_counter()
    started_wall = time.time()

    def plan(workers: int):
        return _plan_shards(data, labels, shard_size, n_shards, shard_sizes, workers, batch_size)

    # Bad data fails before any cluster starts (except with a scheduler
    # address, where the default shard size needs the worker count).
    planned = None
    if scheduler is None:
        guess = len(client.nthreads()) if client is not None else (n_workers or _cpu_count())
        planned = plan(max(1, guess))
    root = None if storage_path is None else Path(storage_path).absolute()
    if root is not None:
        check_storage_root(root, overwrite)

    with _connect(client, scheduler, n_workers, threads_per_worker, timeout) as connected:
        workers = _n_workers(connected, timeout)
        run_started = time.perf_counter()
        shards, dask_blocks, total, _ = planned if planned is not None else plan(workers)
        del planned
        storage = None if root is None else _create_stores(root, local, shards, total, overwrite)
        job = _Job(
            model_path=model_path, model_digest=digest, attach_to=_as_tuple(attach_to),
            exclude=_as_tuple(exclude), method=method, pack_in_graph=bool(pack_in_graph),
            channel_axes=tuple(sorted((channel_axes or {}).items())),
            providers=providers if isinstance(providers, str) else tuple(providers),
            optimization=optimization, threads=threads_per_worker, batch_size=batch_size,
            storage=storage, probe_names=tuple(p.name for p in local.probes),
        )  # fmt: skip
        token = uuid.uuid4().hex[:12]
        where = {shard.index: shard.where for shard in shards}
        with dask.config.set({"distributed.admin.large-graph-warning-threshold": "64GiB"}), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*[Ll]arge graph.*")
            model_future = None
            if model_bytes is not None:
                model_future = connected.submit(
                    _identity, model_bytes, key=f"tensorstate-model-{digest[:16]}-{token}", pure=False
                )
            block_futures = connected.compute(list(dask_blocks)) if dask_blocks else None
            leaves = [
                connected.submit(
                    _run_shard, job, shard, None if block_futures is None else block_futures[i], model_future,
                    key=f"tensorstate-shard-{shard.index}-{token}", pure=False, priority=0,
                )
                for i, shard in enumerate(shards)
            ]  # fmt: skip
            del block_futures, model_future, shards, dask_blocks
            roots = _build_tree(connected, leaves, fan_in, merge_roots or max(workers, _CLIENT_ROOTS), token)
        # _collect empties both lists, so finished shards are released as soon as merged.
        result = _collect(connected, leaves, roots, local, where, len(where), root, storage)

    n, accuracy, stats = result
    if n == 0:
        raise ModelInputError("the data holds no samples (every shard was empty)")
    per_known = {c.name: _states_per_instance(c.probe) for c in local.efficiency_layers}
    for capture in local.efficiency_layers:
        if per_known[capture.name] is not None:
            capture.states_per_instance = per_known[capture.name]
    if storage:
        _mark_stores(storage, range(len(where)), True)
        _attach_stores(local, storage, n)
        local.storage_path = root
    stats.update(
        n_workers=workers, n_shards=len(where), wall_seconds=time.perf_counter() - started,
        run_seconds=time.perf_counter() - run_started,
        tail_seconds=time.time() - stats.pop("_last_end", started_wall),
    )  # fmt: skip
    return ShardedAnalysis(local, accuracy, n, len(where), root, stats)


class _ClientMerger:
    """Merges root results into the client's captures on a thread of its own,
    so that fetching the next result from a worker overlaps merging this one
    (the fetch mostly waits on the worker; the merge kernels release the GIL).
    At most ``_MERGES_QUEUED`` results wait, which bounds the client's memory."""

    def __init__(self, captures):
        self._captures = captures
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tensorstate-merge")
        self._queued: deque = deque()
        self.seconds = 0.0

    def _merge(self, part: _Partial) -> None:
        started = time.perf_counter()
        for capture, counter in zip(self._captures, part.counters):
            if counter is not None:
                capture.merge(counter)
        self.seconds += time.perf_counter() - started

    def submit(self, part: _Partial) -> None:
        """Queue ``part``; raises the error of an earlier merge, if any."""
        while len(self._queued) >= _MERGES_QUEUED or (self._queued and self._queued[0].done()):
            self._queued.popleft().result()
        self._queued.append(self._pool.submit(self._merge, part))

    def finish(self) -> None:
        """Wait for the queued merges; raises the first merge error."""
        while self._queued:
            self._queued.popleft().result()
        self._pool.shutdown()

    def abandon(self) -> None:
        """Drop the queued merges (the run failed; their errors do not matter)."""
        self._queued.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)


def _collect(client, leaves, roots, local, where, n_shards, root, storage):
    """Wait for the run; merge each root into ``local`` once, as it completes."""
    _, distributed = _dask()
    pending = {future.key: future for future in list(leaves) + list(roots)}
    leaf_index = {future.key: i for i, future in enumerate(leaves)}
    root_keys = {future.key for future in roots}
    done: set[int] = set()
    n = correct = labelled = 0
    shard_seconds: list[float] = []
    merge_seconds: list[float] = []
    merge_units: list[int] = []
    gather = 0.0
    last_end = 0.0
    shape_owner: _Partial | None = None
    probe_names = tuple(p.name for p in local.probes)
    merger = _ClientMerger(local.efficiency_layers)
    leaves.clear()
    roots.clear()
    try:
        completed = distributed.as_completed(list(pending.values()), loop=client.loop)
        for future in completed:
            key = future.key
            if future.status == "lost":
                # Its result died with a worker before we read it; Dask recomputes it.
                completed.add(future)
                continue
            pending.pop(key, None)
            if future.status != "finished":
                if future.status == "error":
                    raise future.exception()
                raise RuntimeError(f"task {key} was {future.status}")
            if key in leaf_index:
                done.add(leaf_index[key])
            if key not in root_keys:
                continue
            t0 = time.perf_counter()
            part: _Partial = future.result()
            gather += time.perf_counter() - t0
            del future
            if part.probe_names != probe_names:
                raise RuntimeError(
                    f"the workers probed {list(part.probe_names)} but the client's model has "
                    f"{list(probe_names)}; the model file differs between client and workers"
                )
            if shape_owner is None or shape_owner.sample_shape is None:
                shape_owner = replace(part, counters=[])  # the shape, without holding the counts
            else:
                _check_same_shape(shape_owner, part)
            merger.submit(part)
            n += part.n_samples
            correct += part.correct
            labelled += part.labelled
            shard_seconds += part.shard_seconds
            merge_seconds += part.merge_seconds
            merge_units += part.merge_units
            last_end = max(last_end, part.last_end)
            del part
        merger.finish()
    except BaseException as exc:
        merger.abandon()
        # Cancel only what the client asked for (the roots): cancelling a shard would
        # also cancel its merge tasks, which no client holds (an assertion in Dask).
        # Dropping the other futures releases everything the roots needed.
        client.cancel([f for key, f in pending.items() if key in root_keys])
        pending.clear()
        _mark_stores(storage, done, False)
        failure = _failure(exc, where, len(done), n_shards, root)
        if failure is exc:
            raise
        raise failure from None
    accuracy = None if labelled == 0 else correct / labelled
    if labelled and labelled != n:
        raise ModelInputError(f"only {labelled} of {n} samples had labels; give one label per sample")
    stats = dict(
        shard_seconds=shard_seconds, merge_task_seconds=merge_seconds, merge_task_shards=merge_units,
        gather_seconds=gather,
        client_merge_seconds=merger.seconds, _last_end=last_end,
    )  # fmt: skip
    return n, accuracy, stats


# =========================================================================== CLI


def analyze_cli(
    model_path,
    data,
    labels,
    attach_to,
    exclude,
    method,
    batch_size,
    workers,
    scheduler,
    storage,
    pack_in_graph,
    *,
    providers="cpu",
    timeout: float = 30.0,
    overwrite: bool = False,
) -> tuple[OnnxEfficiencyModel, float | None]:
    """What ``tensorstate-onnx analyze --workers N --scheduler ADDRESS`` runs.

    ``data`` is a path (``.npy`` or zarr directory: read by the workers
    themselves; ``.npz``: loaded here, ``x`` [and ``y``] or arrays named like
    the inputs) or an array / dict of arrays; ``labels`` a ``.npy`` path, an
    array or ``None``. ``workers`` starts a LocalCluster of that many
    processes unless ``scheduler`` names a running one. Returns
    ``(model, accuracy or None)``.
    """
    if isinstance(data, (str, os.PathLike)) and str(data).endswith(".npz"):
        with np.load(data) as archive:
            arrays = {name: archive[name] for name in archive.files}
        if labels is None and "y" in arrays:
            labels = arrays.pop("y")
        data = arrays.pop("x") if "x" in arrays else arrays
        if isinstance(data, dict) and len(data) == 1:
            data = next(iter(data.values()))
    if isinstance(labels, (str, os.PathLike)):
        labels = np.load(labels)
    result = analyze_sharded(
        model_path, data, attach_to, exclude or (), method, labels=labels, batch_size=batch_size,
        n_workers=workers, scheduler=scheduler, storage_path=storage,
        pack_in_graph=pack_in_graph, providers=providers, timeout=timeout, overwrite=overwrite,
    )  # fmt: skip
    return result.model, result.accuracy
