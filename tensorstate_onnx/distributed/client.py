"""The client side of a sharded run: :func:`analyze_sharded`.

It checks the arguments, builds the local model (whose captures receive the
merged counts), plans the shards, connects to a cluster (a given client, a
scheduler address, or a LocalCluster of its own), submits one task per shard
and the reduction tree over them, and merges every root of the tree into the
local model once, as it completes, on a thread of its own.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import socket
import time
import uuid
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from .._optional import import_optional
from ..data import DEFAULT_BATCH_SIZE
from ..errors import (
    ModelInputError,
    OptionError,
    OptionTypeError,
    ProviderError,
    SchedulerConnectionError,
    ShardFailedError,
)
from ..runtime import OnnxEfficiencyModel
from ..store import check_storage_root
from .plan import _plan_shards
from .reduce import _build_tree, _check_same_shape, _Partial
from .storage import _attach_stores, _create_stores, _mark_stores, _states_per_instance
from .worker import _identity, _Job, _run_shard

_CLIENT_ROOTS = 32  # default: the client merges up to this many partials itself
_MERGES_QUEUED = 2  # root results fetched but not yet merged, at most
_MAX_PROTO_BYTES = 1 << 30  # larger ModelProtos must be given as a path on shared storage
_SHARD_KEY = re.compile(r"tensorstate-shard-(\d+)-")


def _dask():
    """Import dask and dask.distributed, or explain how to install them."""
    return tuple(import_optional(name, "distributed", "distributed analysis") for name in ("dask", "distributed"))


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


def _as_tuple(names) -> tuple:
    if names is None:
        return ()
    if isinstance(names, str):
        return (names,)
    return tuple(names)


def _check_count(value, what: str, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise OptionError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _check_scheduler_address(address: str, timeout: float) -> None:
    """Refuse an address Dask cannot parse, and one where nothing listens, at
    once: Dask itself retries a refused port until ``timeout`` and leaves a
    half-built client that complains when collected."""
    _, distributed = _dask()
    if not isinstance(address, str):
        raise OptionTypeError(f"scheduler must be an address string like 'tcp://host:8786', not {type(address).__name__}")
    try:
        scheme, _ = distributed.comm.parse_address(address)
    except Exception as exc:
        raise SchedulerConnectionError(f"{address!r} is not a Dask scheduler address ({exc}); use e.g. tcp://host:8786") from None
    known = sorted(distributed.comm.registry.backends)
    if scheme not in known:
        raise SchedulerConnectionError(
            f"unknown scheme {scheme!r} in the scheduler address {address!r}; use one of {known}, e.g. tcp://host:8786"
        )
    if scheme not in ("tcp", "tls"):
        return
    try:
        host, port = distributed.comm.get_address_host_port(address)
    except Exception as exc:
        raise SchedulerConnectionError(f"{address!r} is not a Dask scheduler address ({exc}); use e.g. tcp://host:8786") from None
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except ConnectionRefusedError:
        raise SchedulerConnectionError(
            f"nothing listens at {address} (connection refused); start the scheduler (`dask scheduler`) "
            "or check the address"
        ) from None
    except OSError:
        pass  # unreachable or slow: Dask's own connect reports it within the timeout


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
        raise OptionError(f"merge_fan_in must be at least 2, got {merge_fan_in}")
    _check_count(threads_per_worker, "threads_per_worker", allow_none=False)
    _check_count(n_workers, "n_workers")
    if client is not None and scheduler is not None:
        raise OptionError("give either client= or scheduler=, not both")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise OptionError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if scheduler is not None:
        _check_scheduler_address(scheduler, timeout)

    # The model: the client builds its own copy (probes, validation) and tells
    # the workers where to find theirs.
    if isinstance(model, onnx.ModelProto):
        if worker_model_path is not None:
            model_path, model_bytes = str(Path(worker_model_path).absolute()), None
        else:
            if model.ByteSize() > _MAX_PROTO_BYTES:
                raise OptionError(
                    "the ModelProto is too large to send to the workers; save it to shared storage "
                    "(tensorstate_onnx.graph.save_model) and pass its path"
                )
            model_path, model_bytes = None, model.SerializeToString()
    elif isinstance(model, (str, os.PathLike)):
        model_path, model_bytes = str(Path(worker_model_path or model).absolute()), None
        model = Path(model).absolute()
    else:
        raise OptionTypeError(f"model must be an onnx.ModelProto or a path to an .onnx file, not {type(model).__name__}")
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
                _mark_stores(storage, done, False)
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
