"""Sharded, distributed analysis of an ONNX model on Dask.

:func:`analyze_sharded` splits a dataset into shards, runs every shard in its
own Dask task (one onnxruntime session per worker process, cached), and
reduces the per-probe :class:`~tensorstate_onnx.engine.StateCounter` of every
shard on the workers, partitioned by a hash of the state. The metrics of the
result (states, distinct states, every entropy, efficiency, network
efficiency, aIQ) are exactly those of a single-process
``OnnxEfficiencyModel.predict``/``evaluate`` over the whole data.

Reduction
    Each shard task splits its counters into ``P`` partitions by a hash of
    the packed state (``StateCounter.partition``: the same partition for a
    state in every process). Partition ``j`` of every shard is taken by a
    small task where the shard result lies and merged by merge tasks keyed
    by partition (``merge_fan_in`` consecutive shards at a time, so merging
    overlaps the shards still running); partitions hold disjoint states, so
    no state is merged twice. Each partition sends the client only, per
    probe, its number of states, of distinct states and the histogram of
    its counts (how many states were seen c times); the client adds those
    up. Every Rényi entropy follows exactly from the histogram, so the
    client never holds the distinct states and its work does not grow with
    them. The merged counters stay on the cluster while the run's client is
    open (``client=``): ``counts()``/``state_ids()`` gather a probe's on
    request; with ``storage_path`` they are rebuilt from the stored states.

Exactly once
    Every task is a pure function of its inputs: a shard task returns fresh
    counters and never touches shared state; piece, merge and summary tasks
    build new objects and never modify their inputs. So Dask may run any of
    them again (after a worker died) without anything being counted twice:
    Dask keeps one result per task key, and a retried task replaces a lost
    result, it never adds to one. The client reads each shard's facts and
    each partition's totals once, by key.

Raw states
    With ``storage_path`` the client creates one zarr array per probe, sized
    for the whole data (``samples * states_per_instance`` rows) with chunks
    that hold whole samples and divide every shard boundary, so each shard
    task writes its own rows ``[start * spi, stop * spi)`` in whole chunks
    that no other task touches. A retried shard rewrites the same region with
    the same bytes. The arrays reopen with :meth:`StateStore.open
    <tensorstate_onnx.store.StateStore.open>` and hold rows in dataset order;
    after a failed run they stay readable: ``complete`` is false,
    ``shards_written`` lists the finished shards, reading stops at the first
    unfinished one (``rows_written``) and rows of finished shards past it read
    by range (``StateStore.written_ranges``); unwritten rows are never read.

Modules: :mod:`.plan` splits the data into shards, :mod:`.worker` is what a
shard task runs, :mod:`.reduce` splits, merges and sums up the counts, :mod:`.storage` writes
the raw states, :mod:`.connect` reaches the cluster, :mod:`.build` checks that
every worker runs the client's build of this library, :mod:`.client` runs it all
(:func:`analyze_sharded`).

``dask[distributed]`` is an optional dependency, imported only by this package
and only when one of its functions is called. (This package shares its last
name with Dask's ``distributed``; Python 3 imports are absolute, so
``import distributed`` anywhere means Dask's.)
"""

from __future__ import annotations

from ..errors import SchedulerConnectionError, ShardFailedError, WorkerBuildError
from .client import ShardedAnalysis, analyze_sharded

__all__ = [
    "ShardedAnalysis",
    "ShardFailedError",
    "SchedulerConnectionError",
    "WorkerBuildError",
    "analyze_sharded",
]
