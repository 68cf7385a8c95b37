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
    after a failed run they stay readable: ``complete`` is false,
    ``shards_written`` lists the finished shards, reading stops at the first
    unfinished one (``rows_written``) and rows of finished shards past it read
    by range (``StateStore.written_ranges``); unwritten rows are never read.

Modules: :mod:`.plan` splits the data into shards, :mod:`.worker` is what a
shard task runs, :mod:`.reduce` merges partial results, :mod:`.storage` writes
the raw states, :mod:`.client` runs it all (:func:`analyze_sharded`).

``dask[distributed]`` is an optional dependency, imported only by this package
and only when one of its functions is called. (This package shares its last
name with Dask's ``distributed``; Python 3 imports are absolute, so
``import distributed`` anywhere means Dask's.)
"""

from __future__ import annotations

from ..errors import SchedulerConnectionError, ShardFailedError
from .client import ShardedAnalysis, analyze_sharded

__all__ = [
    "ShardedAnalysis",
    "ShardFailedError",
    "SchedulerConnectionError",
    "analyze_sharded",
]
