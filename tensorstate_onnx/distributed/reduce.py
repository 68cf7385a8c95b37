"""What shard tasks return and the reduction partitioned by a hash of the state.

A shard task returns a :class:`_ShardResult`: the shard's facts (samples,
accuracy, shape, timings: a :class:`_ShardInfo`, all the client reads of it)
and its per-probe counters split into ``P`` :class:`_Piece` objects by
:meth:`StateCounter.partition <tensorstate_onnx.engine.StateCounter.partition>`,
which puts every state in the same partition in every process. The pieces of
partition ``j`` of every shard hold disjoint states from those of any other
partition, so each partition is merged on its own, by merge tasks on the
workers (:func:`_merge_pieces`, a small tree per partition so that merging
overlaps the shards still running). :func:`_settle` turns a partition's
merged counters into what stays on the cluster, a :class:`_Settled`: their
pickles (each distinct state once as its packed bytes, counts in the
narrowest dtype: a fraction of a counter's working memory) and their totals
per probe (states, distinct states, count histogram), the only part the
client reads; :func:`_combine` adds those up: every Rényi entropy follows from
the histogram of the counts.

Every task here is a pure function of its inputs (it builds new counters and
never modifies what it is given), so Dask may rerun any of them after a lost
worker: a rerun replaces a result, it never adds to one.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..capture import firing_counts_of
from ..engine import StateCounter
from ..errors import ModelInputError, OptionError
from .build import build_id, check_build
from .plan import _shape_text


@dataclass
class _ShardInfo:
    """The facts of one shard that the client reads (small: no counts)."""

    shard: int
    probe_names: tuple
    n_samples: int
    correct: int
    labelled: int
    sample_shape: Any  # per-sample input shape(s), None when no sample was seen
    seconds: float  # wall seconds of the task
    cpu_seconds: float  # CPU seconds of the worker process during the task (counting, splitting)
    split_seconds: float  # CPU seconds of the task's thread splitting the counters into partitions
    last_end: float  # time.time() when the shard finished


@dataclass
class _Piece:
    """Partition ``partition`` (of ``n_partitions``) of the counters of some shards."""

    shards: list[int]
    partition: int
    n_partitions: int
    probe_names: tuple
    counters: list[StateCounter | None]  # one per probe; None: no state of that probe seen
    merge_cpu_seconds: float = 0.0  # CPU seconds of the merge tasks that built this piece
    arrival_error: Exception | None = None  # why its counters could not be read on arrival, see check()

    def check(self) -> None:
        """Raise what went wrong when this piece arrived (another build sent it, say), before its counters are used."""
        if self.arrival_error is not None:
            raise self.arrival_error

    def __sizeof__(self) -> int:
        # What Dask's memory accounting sees (it calls sys.getsizeof on results).
        held = sum(c.nbytes for c in self.counters if c is not None)
        return object.__sizeof__(self) + int(held)

    def __reduce__(self):
        # Pieces move only between the workers of one run: counters go as
        # they are held (see StateCounter.to_transit), their arrays as
        # pickle's out-of-band buffers, not converted to packed bytes and
        # rehashed. That form is this build's own, so the sender's build
        # travels with it.
        counters = [None if c is None else c.to_transit() for c in self.counters]
        fields = (self.shards, self.partition, self.n_partitions, self.probe_names, counters, self.merge_cpu_seconds)
        return _piece_from_transit, (build_id(), *fields, self.arrival_error)


def _piece_from_transit(
    build, shards, partition, n_partitions, probe_names, counters, merge_cpu_seconds, arrival_error
) -> _Piece:
    """The piece that :meth:`_Piece.__reduce__` sent (by a process of build ``build``).

    A piece that cannot be read here (sent by another build, or not whole)
    arrives without counters and with the error, which the task using it
    raises (:meth:`_Piece.check`): an error raised while Dask deserializes
    fails no task, the transfer is retried forever."""
    if arrival_error is None:
        try:
            where = f"the worker that received partition {partition} of shards {shards}"
            check_build(build, where, "the worker that sent it")
            loaded = [None if form is None else StateCounter.from_transit(form) for form in counters]
        except Exception as exc:
            arrival_error = exc
    if arrival_error is not None:
        loaded = [None] * len(counters)
    return _Piece(shards, partition, n_partitions, probe_names, loaded, merge_cpu_seconds, arrival_error)


@dataclass
class _ShardResult:
    """What a shard task returns: its facts and its counters split into partitions."""

    info: _ShardInfo
    pieces: list[_Piece]

    def __sizeof__(self) -> int:
        return object.__sizeof__(self) + sum(piece.__sizeof__() for piece in self.pieces)


@dataclass
class _ProbeTotals:
    """What the metrics need of one probe's counts: ``histogram`` is
    ``StateCounter.count_histogram()``."""

    n_neurons: int
    total: int
    n_distinct: int
    histogram: tuple[np.ndarray, np.ndarray]
    firing: np.ndarray  # per neuron, in how many states it fires (they add up across partitions)


@dataclass
class _Summary:
    """What a partition sends the client: per-probe totals (None: no state) and timings."""

    partition: int
    shards: list[int]
    probes: list[_ProbeTotals | None]
    merge_cpu_seconds: float
    settle_cpu_seconds: float = 0.0  # CPU seconds of summing up the merged partition and pickling it


@dataclass
class _Settled:
    """A merged partition as it stays on the cluster: its summary, and each
    probe's counter as its pickle (None: no state), unpickled on request."""

    summary: _Summary
    pickles: list[bytes | None]

    def __sizeof__(self) -> int:
        return object.__sizeof__(self) + sum(len(blob) for blob in self.pickles if blob is not None)


_WHOLE_UP_TO = 16  # neurons: at most 65,536 states, counted in a table that merges by adding


def _split(counters: list[StateCounter | None], shard: int, names: tuple, n_partitions: int) -> list[_Piece]:
    """The shard's counters as ``n_partitions`` pieces, partition ``j`` in piece ``j``
    (with one partition, the counters themselves: merges never modify their inputs).

    A counter of up to 16 neurons is not split: it goes whole to partition
    ``probe % n_partitions`` in every shard (a table of at most 65,536 counts
    costs the same to send and merge whether it holds one state or all, so
    splitting it would multiply that cost by the partitions)."""
    if n_partitions == 1:
        return [_Piece([shard], 0, 1, names, list(counters))]
    split = []
    for probe, counter in enumerate(counters):
        if counter is not None and counter.n_neurons <= _WHOLE_UP_TO:
            parts: list[StateCounter | None] = [None] * n_partitions
            parts[probe % n_partitions] = counter
        else:
            parts = counter.partition(n_partitions) if counter is not None else [None] * n_partitions
        split.append(parts)
    return [
        _Piece([shard], j, n_partitions, names, [parts[j] for parts in split]) for j in range(n_partitions)
    ]


def _shard_info(result: _ShardResult) -> _ShardInfo:
    """Task: the shard's facts, without its counts (what the client gathers of a shard)."""
    return result.info


def _piece(result: _ShardResult, partition: int) -> _Piece:
    """Task: the shard's piece of ``partition`` (runs where the shard result lies)."""
    return result.pieces[partition]


def _merge_pieces(partition: int, n_partitions: int, *pieces: _Piece) -> _Piece:
    """Task: one piece of ``partition`` holding the counts of ``pieces`` (not modified).

    Refuses pieces of another partition, split into another number of
    partitions, or holding counts of another number of neurons for a probe:
    merging them would give wrong counts, not an error.
    """
    started = time.thread_time()  # the merge runs in this thread alone; transfers are the worker's
    first = pieces[0]
    for piece in pieces:
        piece.check()
        if piece.partition != partition or piece.n_partitions != n_partitions:
            raise OptionError(
                f"the merge of partition {partition} of {n_partitions} got partition {piece.partition} of "
                f"{piece.n_partitions} from shards {piece.shards}; every shard must be split the same way"
            )
        if piece.probe_names != first.probe_names:
            raise RuntimeError(
                f"shards {first.shards} and {piece.shards} probed different tensors; the model "
                "file differs between workers"
            )
    counters: list[StateCounter | None] = []
    for i, name in enumerate(first.probe_names):
        present = [(piece.shards, piece.counters[i]) for piece in pieces if piece.counters[i] is not None]
        if not present:
            counters.append(None)
            continue
        width_shards, width = present[0][0], present[0][1].n_neurons
        for shards, counter in present:
            if counter.n_neurons != width:
                raise ModelInputError(
                    f"probe {name!r} has states of {counter.n_neurons} neurons in shards {shards} but of "
                    f"{width} in shards {width_shards} (partition {partition}); every shard must give "
                    "the probe the same number of neurons"
                )
        merged = StateCounter(width)
        merged.merge_many([counter for _, counter in present])
        counters.append(merged)
    return _Piece(
        shards=sorted(s for piece in pieces for s in piece.shards), partition=partition,
        n_partitions=n_partitions, probe_names=first.probe_names, counters=counters,
        merge_cpu_seconds=sum(p.merge_cpu_seconds for p in pieces) + time.thread_time() - started,
    )  # fmt: skip


def _settle(piece: _Piece) -> _Settled:
    """Task: a merged partition's summary and its counters' pickles, which is
    all that stays on the cluster (the merged piece, in the counters' working
    form, is released once this is done)."""
    started = time.thread_time()
    piece.check()
    pickles: list[bytes | None] = []
    probes: list[_ProbeTotals | None] = []
    for counter in piece.counters:
        if counter is None or counter.total == 0:
            pickles.append(None)
            probes.append(None)
        else:
            blob, ids, counts = counter.pickle_with_states()  # the states converted once for both
            pickles.append(blob)
            probes.append(_totals(counter, ids, counts))
    summary = _Summary(piece.partition, piece.shards, probes, piece.merge_cpu_seconds)
    summary.settle_cpu_seconds = time.thread_time() - started
    return _Settled(summary, pickles)


def _summary_of(settled: _Settled) -> _Summary:
    """Task: the totals of a settled partition (what the client gathers of it)."""
    return settled.summary


def _totals(counter: StateCounter, ids: np.ndarray, counts: np.ndarray) -> _ProbeTotals:
    """What the metrics need of ``counter``, which holds the states ``ids`` seen ``counts`` times."""
    firing = firing_counts_of(ids, counts, counter.n_neurons)
    return _ProbeTotals(counter.n_neurons, counter.total, counter.n_distinct, counter.count_histogram(), firing)


def _probe_counter(settled: _Settled, probe: int) -> StateCounter | None:
    """Task: the merged counter of one probe in a partition (for gathering on request)."""
    blob = settled.pickles[probe]
    return None if blob is None else pickle.loads(blob)


def _combine(summaries: list[_Summary], names: tuple) -> list[_ProbeTotals | None]:
    """Per probe, the totals of all partitions: states and distinct states
    add up, and so do the histograms (the partitions hold disjoint states)."""
    combined: list[_ProbeTotals | None] = []
    for i, name in enumerate(names):
        parts = [(s.partition, s.probes[i]) for s in summaries if s.probes[i] is not None]
        if not parts:
            combined.append(None)
            continue
        widths = {totals.n_neurons: partition for partition, totals in parts}
        if len(widths) > 1:
            detail = ", ".join(f"{w} in partition {j}" for w, j in sorted(widths.items()))
            raise ModelInputError(
                f"probe {name!r} has states of different numbers of neurons ({detail}); every shard "
                "must give the probe the same number of neurons"
            )
        values = np.concatenate([totals.histogram[0] for _, totals in parts])
        multiplicities = np.concatenate([totals.histogram[1] for _, totals in parts])
        unique, inverse = np.unique(values, return_inverse=True)
        summed = np.zeros(unique.size, np.int64)
        np.add.at(summed, inverse, multiplicities)
        combined.append(
            _ProbeTotals(
                parts[0][1].n_neurons, sum(t.total for _, t in parts), sum(t.n_distinct for _, t in parts),
                (unique.astype(np.int64), summed), np.sum([t.firing for _, t in parts], axis=0),
            )  # fmt: skip
        )
    return combined


def _check_same_shape(a: _ShardInfo, b: _ShardInfo) -> None:
    """Raise ``ModelInputError`` if the two shards saw samples of different shapes."""
    if a.sample_shape is not None and b.sample_shape is not None and a.sample_shape != b.sample_shape:
        raise ModelInputError(
            f"shard {b.shard} has samples of shape {_shape_text(b.sample_shape)} but shard "
            f"{a.shard} has {_shape_text(a.sample_shape)}; every shard must hold samples "
            "of the same shape"
        )


def _reduction_graph(shard_keys: list[str], n_partitions: int, fan_in: int, token: str) -> tuple[dict, list, list]:
    """The tasks of the reduction over the shard tasks ``shard_keys``, as a
    Dask graph: for each partition, a piece of every shard merged ``fan_in``
    consecutive shards at a time (so merges start while later shards run)
    down to one, settled (what stays on the cluster: the root keys) and its
    summary read. Returns ``(graph, root keys, summary keys)``."""
    graph: dict = {}
    roots, summaries = [], []
    for j in range(n_partitions):
        level = []
        for s, shard in enumerate(shard_keys):
            key = f"tensorstate-piece-{s}-{j}-{token}"
            graph[key] = (_piece, shard, j)
            level.append(key)
        depth = 0
        while len(level) > 1 or depth == 0:
            depth += 1
            merged = []
            for g in range(0, len(level), fan_in):
                key = f"tensorstate-merge-{j}-{depth}-{g // fan_in}-{token}"
                graph[key] = (_merge_pieces, j, n_partitions, *level[g : g + fan_in])
                merged.append(key)
            level = merged
        roots.append(f"tensorstate-settled-{j}-{token}")
        graph[roots[-1]] = (_settle, level[0])
        summaries.append(f"tensorstate-summary-{j}-{token}")
        graph[summaries[-1]] = (_summary_of, roots[-1])
    return graph, roots, summaries
