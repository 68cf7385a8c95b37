"""The client side of a sharded run: :func:`analyze_sharded`.

It checks the arguments, builds the local model (whose captures receive the
totals of the counts), plans the shards, connects to a cluster (a given
client, a scheduler address, or a LocalCluster of its own), submits one task
per shard and the partitioned reduction over them (:mod:`.reduce`), and reads
each shard's facts and each partition's totals once, as they complete. The
merged counters stay on the cluster: a capture gathers its probe's on request.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import re
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from ..engine import StateCounter
from ..errors import (
    ModelInputError,
    NoStatesError,
    OptionError,
    OptionTypeError,
    ProviderError,
    ShardFailedError,
)
from ..runtime import OnnxEfficiencyModel
from ..store import StateStore, check_storage_root, remove_state_stores
from .._system import usable_cpus
from .build import build_id
from .connect import check_scheduler_address, connect, dask_modules, n_workers_of
from .plan import _plan_shards
from .reduce import (
    _check_same_shape,
    _combine,
    _probe_counter,
    _reduction_graph,
    _shard_info,
    _ShardInfo,
    _Summary,
)
from .storage import _attach_stores, _create_stores, _mark_stores, _states_per_instance
from .worker import _identity, _Job, _run_shard

_MAX_PARTITIONS = 4096  # beyond this the run is mostly scheduling: shards x partitions piece tasks
_DEFAULT_MAX_PARTITIONS = 64  # the default: one partition per worker up to this many
_STORE_READ_ROWS = 1 << 20  # rows read at a time when counts are rebuilt from a store
_MAX_PROTO_BYTES = 1 << 30  # larger ModelProtos must be given as a path on shared storage
_SHARD_KEY = re.compile(r"tensorstate-shard-(\d+)-")


@dataclass
class ShardedAnalysis:
    """The outcome of :func:`analyze_sharded`.

    ``model`` is a locally built :class:`OnnxEfficiencyModel` whose
    ``efficiency_layers`` hold each probe's totals: states, distinct states
    and the histogram of the counts, which give every metric (it never ran
    the data);
    ``accuracy`` is the accuracy of the first output, or ``None`` without
    labels. Unpacks as ``model, accuracy = analyze_sharded(...)``.
    ``stats`` holds timings: per-shard wall and CPU seconds (and the CPU
    seconds of splitting each shard into partitions), the CPU seconds of
    each partition's merge tasks and of settling it (its totals and its
    counters' pickles, what stays on the cluster), the CPU seconds of the client reading the
    results (``client_cpu_seconds``) and of its whole process during the
    call (``client_process_cpu_seconds``), the wall time, and
    the time from the end of the last shard to the end of the run
    (``tail_seconds``).

    The merged counters stay on the cluster, partition by partition, while
    the run's client is open (``client=``); ``counts()``, ``state_ids()``
    and ``counter`` of a capture gather that probe's to the client on
    request. :meth:`release` lets the cluster drop them.
    """

    model: OnnxEfficiencyModel
    accuracy: float | None
    n_samples: int
    n_shards: int
    storage_path: Path | None = None
    stats: dict = field(default_factory=dict)
    n_partitions: int = 1
    _counts: "_ClusterCounts | None" = field(default=None, repr=False)

    def __iter__(self):
        return iter((self.model, self.accuracy))

    def release(self) -> None:
        """Let the cluster drop the merged counters (entropies and
        efficiencies stay; counts and state ids can no longer be gathered)."""
        if self._counts is not None:
            self._counts.release()


class _ClusterCounts:
    """The merged partitions of a run, on the cluster, and how to gather one probe's counter."""

    def __init__(self, client, roots: list, names: tuple):
        self.client = client
        self.roots = roots
        self.names = names

    def release(self) -> None:
        self.roots = None

    def gather(self, probe: int, n_neurons: int) -> StateCounter:
        """The probe's counter: its counter in every partition, merged here."""
        name = self.names[probe]
        if self.roots is None:
            raise NoStatesError(
                f"the counts of probe {name!r} were on the Dask cluster and have been released "
                "(ShardedAnalysis.release()); run again to get them"
            )
        try:
            futures = [
                self.client.submit(_probe_counter, root, probe, key=f"{root.key}-probe-{probe}", pure=False)
                for root in self.roots
            ]  # fmt: skip
            parts = self.client.gather(futures)
        except Exception as exc:
            raise NoStatesError(
                f"could not gather the counts of probe {name!r} from the Dask cluster "
                f"({type(exc).__name__}: {exc}); they stay there only while the run's client is open"
            ) from None
        counter = StateCounter(n_neurons)
        for part in parts:
            if part is not None:
                counter.merge(part)
        return counter


def _counter_from_store(directory: str, n_neurons: int) -> StateCounter:
    """The counts of every state a sharded run stored for one probe."""
    store = StateStore.open(directory)
    counter = StateCounter(n_neurons)
    for start in range(0, len(store), _STORE_READ_ROWS):
        counter.add(store.read(slice(start, min(len(store), start + _STORE_READ_ROWS))))
    return counter


def _no_gather(name: str):
    def gather():
        raise NoStatesError(
            f"the counts of probe {name!r} were merged on the Dask cluster of the run, which ended with "
            "it; its states, distinct states, entropies and efficiencies are here. To gather counts() "
            "and state_ids() on request, run analyze_sharded with client= (an open distributed.Client); "
            "or give storage_path= to keep the raw states"
        )

    return gather


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


def _check_whole_batches(local: OnnxEfficiencyModel, shards: list, total: int | None) -> None:
    """Refuse, before the run, data or shards (dask chunks, callable shard sizes)
    that ``local``, whose batch size is fixed, cannot run in whole batches."""
    if total is not None:
        local.check_whole_batches(total)
    fixed = local.fixed_batch_size
    for shard in shards:
        if shard.size is not None and shard.size % fixed:
            raise ModelInputError(
                f"{shard.where} holds {shard.size} samples, but the model takes batches of exactly "
                f"{fixed}; give shard_size (a multiple of {fixed}) or chunks, shard_sizes that hold whole batches"
            )


def _build_local_model(model, attach_to, exclude, method, providers, optimization, pack_in_graph, channel_axes):
    kwargs = dict(optimization=optimization, pack_in_graph=pack_in_graph, channel_axes=channel_axes)
    try:
        return OnnxEfficiencyModel(model, attach_to, exclude, method, providers=providers, **kwargs)
    except ProviderError:
        # The client only holds the results; the workers may have providers it lacks.
        return OnnxEfficiencyModel(model, attach_to, exclude, method, providers="cpu", **kwargs)


def _failure(exc: BaseException, shard_where: dict, n_done: int, n_shards: int, storage_path) -> BaseException:
    """A clear exception for a failed run (KilledWorker becomes ShardFailedError)."""
    _, distributed = dask_modules()
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
    partitions: int | None = None,
    merge_fan_in: int = 16,
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
        batch_size: samples per onnxruntime run inside a shard (default: as
            :meth:`OnnxEfficiencyModel.predict` picks it on each worker: the
            model's fixed batch size, or 256, fewer on CPU where a batch's
            probe outputs would pass 24 MiB).
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
        partitions: the number ``P`` of partitions the counts are reduced
            in. Each shard splits every probe's counter into ``P`` by a hash
            of the state; partition ``j`` of every shard is merged by tasks
            of its own on the workers, and only its totals (states, distinct
            states, histogram of the counts) reach the client, so the client
            never holds the distinct states. Default: one per worker, at most
            64 (the scheduler handles shards x partitions tasks, which past
            that costs more than the larger merges it saves) and at most
            shards x probes. At most shards x probes and 4096.
        merge_fan_in: pieces per merge task: a partition's pieces are merged
            this many consecutive shards at a time, level by level, so merging
            starts while later shards still run.

    Returns:
        :class:`ShardedAnalysis` (``model, accuracy = analyze_sharded(...)``).

    Raises:
        ImportError without dask.distributed; ModelFileError for a model the
        client or the workers cannot read; ModelInputError for empty data,
        labels that do not fit, or shards whose samples differ in shape (the
        message names the shard) or probes whose number of neurons differs
        between shards; OptionError for ``partitions`` < 1 or more than the
        run can use; SchedulerConnectionError when the scheduler
        cannot be reached within ``timeout`` or has no workers;
        ShardFailedError when a shard kills its worker more often than
        ``distributed.scheduler.allowed-failures`` allows; StorageExistsError
        for an existing storage path.
    """
    dask, distributed = dask_modules()
    batch_size = _check_count(batch_size, "batch_size")
    shard_size = _check_count(shard_size, "shard_size")
    fan_in = _check_count(merge_fan_in, "merge_fan_in", allow_none=False)
    if fan_in < 2:
        raise OptionError(f"merge_fan_in must be at least 2, got {merge_fan_in}")
    _check_count(partitions, "partitions")
    _check_count(threads_per_worker, "threads_per_worker", allow_none=False)
    _check_count(n_workers, "n_workers")
    if client is not None and scheduler is not None:
        raise OptionError("give either client= or scheduler=, not both")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise OptionError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if scheduler is not None:
        check_scheduler_address(scheduler, timeout)

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
    # Shards are planned in batches of what the workers will run (they pick the
    # default themselves: their providers may differ from the client's).
    fixed = local.fixed_batch_size
    shard_batch = local.run_batch_size(batch_size)
    if fixed is not None and shard_size is not None and shard_size % fixed:
        raise OptionError(
            f"the model takes batches of exactly {fixed} samples (its inputs' first axis is fixed), so "
            f"shard_size={shard_size} cannot be used; give a multiple of {fixed} or leave shard_size out"
        )
    digest = hashlib.sha256(model_bytes).hexdigest() if model_bytes is not None else ""
    started = time.perf_counter()
    started_wall = time.time()
    started_cpu = time.process_time()

    def plan(workers: int):
        planned = _plan_shards(data, labels, shard_size, n_shards, shard_sizes, workers, shard_batch, fixed is not None)
        if fixed is not None:
            _check_whole_batches(local, planned[0], planned[2])
        return planned

    # Bad data fails before any cluster starts (except with a scheduler
    # address, where the default shard size needs the worker count).
    planned = None
    if scheduler is None:
        guess = len(client.nthreads()) if client is not None else (n_workers or usable_cpus())
        planned = plan(max(1, guess))
        if partitions is not None:
            _n_partitions(partitions, 1, len(planned[0]), len(local.probes))  # refused before any cluster starts
    root = None if storage_path is None else Path(storage_path).absolute()
    if root is not None:
        check_storage_root(root, overwrite)

    with connect(client, scheduler, n_workers, threads_per_worker, timeout) as connected:
        workers = n_workers_of(connected, timeout)
        run_started = time.perf_counter()
        shards, dask_blocks, total, _ = planned if planned is not None else plan(workers)
        del planned
        n_partitions = _n_partitions(partitions, workers, len(shards), len(local.probes))
        if root is not None and overwrite:
            remove_state_stores(root)
        storage = None if root is None else _create_stores(root, local, shards, total, overwrite)
        job = _Job(
            model_path=model_path, model_digest=digest, attach_to=_as_tuple(attach_to),
            exclude=_as_tuple(exclude), method=method, pack_in_graph=bool(pack_in_graph),
            channel_axes=tuple(sorted((channel_axes or {}).items())),
            providers=providers if isinstance(providers, str) else tuple(providers),
            optimization=optimization, threads=threads_per_worker, batch_size=batch_size,
            storage=storage, probe_names=tuple(p.name for p in local.probes), n_partitions=n_partitions,
            build=build_id(),
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
            # One graph, sent in one message: shard tasks, their facts, the reduction.
            graph: dict = {}
            shard_keys, info_keys = [], []
            for i, shard in enumerate(shards):
                key = f"tensorstate-shard-{shard.index}-{token}"
                block = None if block_futures is None else block_futures[i]
                graph[key] = (_run_shard, job, shard, block, model_future)
                shard_keys.append(key)
                info_keys.append(f"tensorstate-info-{shard.index}-{token}")
                graph[info_keys[-1]] = (_shard_info, key)
            reduction, root_keys, summary_keys = _reduction_graph(shard_keys, n_partitions, fan_in, token)
            graph.update(reduction)
            # The client holds no shard result: each lives until its pieces and facts are taken.
            infos, roots, summaries = connected.get(graph, [info_keys, root_keys, summary_keys], sync=False)
            del block_futures, model_future, shards, dask_blocks, graph, reduction
        # _collect empties both lists, so each result is released once read.
        result = _collect(connected, infos, summaries, roots, local, where, len(where), root, storage)
        kept = _ClusterCounts(connected, roots, tuple(p.name for p in local.probes)) if client is not None else None
        del roots

    n, accuracy, totals, stats = result
    if n == 0:
        raise ModelInputError("the data holds no samples (every shard was empty)")
    for i, (capture, probe_totals) in enumerate(zip(local.efficiency_layers, totals)):
        if probe_totals is None:
            continue
        width = probe_totals.n_neurons
        if kept is not None:
            gather = functools.partial(kept.gather, i, width)
        elif storage:
            gather = functools.partial(_counter_from_store, storage[capture.name][0], width)
        else:
            gather = _no_gather(capture.name)
        capture.adopt_summary(
            width, probe_totals.total, probe_totals.n_distinct, probe_totals.histogram, gather, probe_totals.firing
        )
    per_known = {c.name: _states_per_instance(c.probe, local.fixed_batch_size) for c in local.efficiency_layers}
    for capture in local.efficiency_layers:
        if per_known[capture.name] is not None:
            capture.states_per_instance = per_known[capture.name]
    if storage:
        _mark_stores(storage, range(len(where)), True)
        _attach_stores(local, storage, n)
        local.storage_path = root
    stats.update(
        n_workers=workers, n_shards=len(where), n_partitions=n_partitions,
        wall_seconds=time.perf_counter() - started, run_seconds=time.perf_counter() - run_started,
        client_process_cpu_seconds=time.process_time() - started_cpu,
        tail_seconds=time.time() - stats.pop("_last_end", started_wall),
    )  # fmt: skip
    return ShardedAnalysis(local, accuracy, n, len(where), root, stats, n_partitions, kept)


def _n_partitions(partitions: int | None, workers: int, n_shards: int, n_probes: int) -> int:
    """``partitions`` checked against the run, or the default: one per worker, up to 64."""
    limit = min(_MAX_PARTITIONS, max(1, n_shards * n_probes))
    if partitions is None:
        return max(1, min(workers, _DEFAULT_MAX_PARTITIONS, limit))
    if partitions > limit:
        raise OptionError(
            f"partitions={partitions} is more than this run can use: at most {limit} (the shards x probes, "
            f"{n_shards} x {n_probes}, and at most {_MAX_PARTITIONS}); every shard makes a task per "
            "partition, so more partitions than that only add scheduling. Use fewer, or leave it to "
            "the default (one per worker, up to 64)"
        )
    return partitions


def _collect(client, infos, summaries, roots, local, where, n_shards, root, storage):
    """Wait for the run; read each shard's facts and each partition's totals once, as they complete."""
    _, distributed = dask_modules()
    cpu_started = time.thread_time()
    pending = {future.key: future for future in list(infos) + list(summaries)}
    held = list(roots)
    info_keys = {future.key for future in infos}
    done: set[int] = set()
    n = correct = labelled = 0
    shard_info: dict[int, _ShardInfo] = {}
    got: list[_Summary] = []
    gather = 0.0
    shape_owner: _ShardInfo | None = None
    probe_names = tuple(p.name for p in local.probes)
    infos.clear()
    summaries.clear()
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
            t0 = time.perf_counter()
            value = future.result()
            gather += time.perf_counter() - t0
            del future
            if key not in info_keys:
                got.append(value)
                continue
            info: _ShardInfo = value
            if info.probe_names != probe_names:
                raise RuntimeError(
                    f"the workers probed {list(info.probe_names)} but the client's model has "
                    f"{list(probe_names)}; the model file differs between client and workers"
                )
            if shape_owner is None or shape_owner.sample_shape is None:
                shape_owner = info
            else:
                _check_same_shape(shape_owner, info)
            shard_info[info.shard] = info
            n += info.n_samples
            correct += info.correct
            labelled += info.labelled
            done.add(info.shard)
            _mark_stores(storage, done, False)
        totals = _combine(sorted(got, key=lambda s: s.partition), probe_names)
    except BaseException as exc:
        # Cancel what the client asked for; the shards and pieces they needed are then released.
        client.cancel(list(pending.values()) + held)
        pending.clear()
        _mark_stores(storage, done, False)
        failure = _failure(exc, where, len(done), n_shards, root)
        if failure is exc:
            raise
        raise failure from None
    accuracy = None if labelled == 0 else correct / labelled
    if labelled and labelled != n:
        raise ModelInputError(f"only {labelled} of {n} samples had labels; give one label per sample")
    ordered = [shard_info[s] for s in sorted(shard_info)]
    stats = dict(
        shard_seconds=[i.seconds for i in ordered], shard_cpu_seconds=[i.cpu_seconds for i in ordered],
        split_cpu_seconds=[i.split_seconds for i in ordered],
        partition_merge_cpu_seconds=[s.merge_cpu_seconds for s in sorted(got, key=lambda s: s.partition)],
        partition_settle_cpu_seconds=[s.settle_cpu_seconds for s in sorted(got, key=lambda s: s.partition)],
        gather_seconds=gather, client_cpu_seconds=time.thread_time() - cpu_started,
        _last_end=max((i.last_end for i in ordered), default=0.0),
    )  # fmt: skip
    return n, accuracy, totals, stats
