"""One probe's capture: engine + store + metrics behind the TensorState API.

``AbstractStateCapture`` is what every front end feeds: the Keras
``StateCapture`` layer, the PyTorch ``StateCaptureHook`` and the ONNX probes
are thin subclasses that call :meth:`AbstractStateCapture.record` with a tensor
and its channel axis.
"""

from __future__ import annotations

import abc
import os
import threading
from pathlib import Path

import numpy as np

from . import metrics
from .engine import StateCounter, n_bytes_for, pack
from .engine.bits import weighted_bit_counts
from .errors import IndexOutOfRangeError, ModelInputError, NoStatesError, OptionError, OptionTypeError
from .store import StaleStoreSweep, StateStore

__all__ = ["AbstractStateCapture", "StateCaptureProbe", "batch_axis", "batch_instances", "sweep_stale_stores"]


def batch_axis(shape, channel_axis: int, batch_size: int | None, preferred: int = 0) -> int:
    """The axis of a probed tensor of ``shape`` that holds the batch's samples, so
    its states can be ordered batch first (DESIGN §1) whichever axis that is.

    Axis 0 when its length is the batch size (or ``batch_size`` is None, or the
    rank is below 3, or axis 0 holds the neurons). Otherwise the one other
    axis, besides the neurons, that is ``batch_size`` long: a sequence-first
    ``[L, N, D]`` tensor inside a batch-first model (an ``nn.LSTM`` or
    ``nn.MultiheadAttention`` without ``batch_first``, a Transpose) has its
    samples on axis 1. Where none or several are, axis 0: flattened tokens
    ``[N*L, D]`` stay as they are. ``preferred``, the axis an earlier batch
    showed, wins while it is ``batch_size`` long: a last, smaller batch whose
    size happens to be the sequence length keeps its samples on that axis. The
    rule reads shapes only, so every path (PyTorch hooks, ONNX, in-graph
    packing) takes the same axis.
    """
    rank = len(shape)
    channel_axis %= max(rank, 1)
    if batch_size is None or rank < 3 or channel_axis == 0:
        return 0
    if 0 < preferred < rank and preferred != channel_axis and shape[preferred] == batch_size:
        return preferred
    if shape[0] == batch_size:
        return 0
    matches = [k for k in range(1, rank) if k != channel_axis and shape[k] == batch_size]
    return matches[0] if len(matches) == 1 else 0


def batch_instances(shape, channel_axis: int) -> int:
    """Input instances in a batch of ``shape`` whose neurons lie on ``channel_axis``:
    the length of axis 0, or 1 when axis 0 holds the neurons (or the shape is
    empty). A rank-1 ``[N]`` tensor is ``N`` instances of one neuron."""
    if not shape:
        return 1
    rank = len(shape)
    if rank == 1:
        return int(shape[0])
    return 1 if channel_axis % rank == 0 else int(shape[0])


def sweep_stale_stores(captures, storage_path: str | os.PathLike | None, overwrite: bool) -> None:
    """With ``overwrite`` and a storage path, give a run's captures one
    :class:`StaleStoreSweep`: once the first of them has created its store, the
    stores of an earlier run under ``storage_path`` that none of them writes are
    deleted (the same on every front end)."""
    if not overwrite or storage_path is None:
        return
    sweep = StaleStoreSweep(storage_path, [c.disk_path.name for c in captures if c.disk_path is not None])
    for capture in captures:
        capture.stale_store_sweep = sweep


class AbstractStateCapture(abc.ABC):
    """Records the firing states of one probed tensor and computes its entropy.

    Args:
        name: the probe's name, unique within a model.
        disk_path: directory of a zarr store for the raw states. ``None`` keeps
            them in memory when ``keep_states`` is true: uncompressed, one copy
            of the packed bytes (``ceil(C/8)`` per state), compressed only when
            ``states`` is read (see :class:`~tensorstate_onnx.store.StateStore`).
        keep_states: keep the raw states (needed for ``states`` and for
            ``counts(index=...)``). Counts, entropy and efficiency never need
            them: they come from a streaming counter whose memory grows with
            the number of distinct states only.
        overwrite: replace an existing store at ``disk_path``.
        metadata: extra facts stored with the states (node, method, ...).
    """

    def __init__(
        self,
        name: str,
        disk_path: str | os.PathLike | None = None,
        keep_states: bool = True,
        overwrite: bool = False,
        metadata: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.name = name
        self.disk_path = None if disk_path is None else Path(disk_path)
        self.keep_states = keep_states or disk_path is not None
        self.metadata = dict(metadata or {})
        self.capture_on = True
        self.input_shape = None
        #: The neuron axis of the recorded tensors (rank-1 tensors are read as
        #: ``[N, 1]``, axis 1); ``None`` until known.
        self.channel_axis: int | None = None
        self._overwrite = overwrite
        self._record_lock = threading.Lock()
        self._held: list | None = None  # batches of a pass not yet counted (see hold)
        #: Shared by a run's captures with overwrite (see :func:`sweep_stale_stores`).
        self.stale_store_sweep: StaleStoreSweep | None = None
        if self.disk_path is not None:
            StateStore.check_free(self.disk_path, overwrite)
        self._clear()

    def _clear(self) -> None:
        self.n_neurons: int | None = None
        #: The axis that held the samples in the last batch (see :func:`batch_axis`).
        self.sample_axis = 0
        self.states_per_instance: int | None = None
        self._counter: StateCounter | None = None
        self._store: StateStore | None = None
        self._batches: list[tuple[int, int]] = []  # (instances, states per instance)
        self._result: tuple[np.ndarray, np.ndarray] | None = None
        # A sharded run's totals, when the counter stayed on the cluster:
        # (states, distinct states, count histogram) and how to gather it.
        self._summary: tuple[int, int, tuple[np.ndarray, np.ndarray]] | None = None
        self._summary_firing: np.ndarray | None = None  # per-neuron firing counts with the summary
        self._gather = None

    # ------------------------------------------------------------------ recording

    def record(
        self, tensor: np.ndarray, channel_axis: int, keep: np.ndarray | None = None, batch_size: int | None = None
    ) -> None:
        """Quantize, pack, count and (optionally) store one batch.

        Axis 0 is the batch axis unless it is the channel axis (then the whole
        tensor is one instance), or, given the ``batch_size`` of the batch, the
        axis :func:`batch_axis` finds: the states are ordered by it first. A
        rank-1 tensor ``[N]`` is one neuron per sample: it is read as ``[N, 1]``,
        whose neurons are on axis 1 (or -1). ``keep`` leaves out masked states,
        in that order (see :meth:`record_packed`).
        """
        if not self.capture_on:
            return
        tensor = np.asarray(tensor) if not isinstance(tensor, np.ndarray) else tensor
        if tensor.ndim == 1:
            tensor = tensor.reshape(-1, 1)
        axis = channel_axis % tensor.ndim
        self.channel_axis = axis
        first = self.find_sample_axis(tensor.shape, axis, batch_size)
        if first:
            tensor = np.moveaxis(tensor, first, 0)
            axis += axis < first
        packed = pack(tensor, axis)
        self.record_packed(packed, tensor.shape[axis], batch_instances(tensor.shape, axis), keep)

    def find_sample_axis(self, shape, channel_axis: int, batch_size: int | None) -> int:
        """:func:`batch_axis` of a batch of ``shape``, preferring the axis the last batch had."""
        self.sample_axis = batch_axis(shape, channel_axis, batch_size, self.sample_axis)
        return self.sample_axis

    def record_packed(self, packed: np.ndarray, n_neurons: int, instances: int, keep: np.ndarray | None = None) -> None:
        """Count and store states already packed (by ``engine.pack`` or in an ONNX graph).

        ``keep`` (one flag per state) leaves out the states of masked positions,
        such as padding tokens: they are neither counted nor stored, and each
        instance keeps the states it had left.
        """
        if not self.capture_on:
            return
        if self._held is not None:
            self._held.append((packed, n_neurons, instances, keep))
            return
        self._gather_counter()  # more states for counts a sharded run left on the cluster
        if keep is not None:
            keep = np.asarray(keep, dtype=bool).ravel()
            if keep.size != packed.shape[0] or not instances or packed.shape[0] % instances:
                raise ModelInputError(
                    f"probe {self.name!r}: a mask of {keep.size} positions does not fit {packed.shape[0]} "
                    f"states of {instances} instances"
                )
            kept = keep.reshape(instances, -1).sum(axis=1)
            packed = packed[keep]
        with self._record_lock:
            if self.n_neurons is None:
                self._start(int(n_neurons))
            elif n_neurons != self.n_neurons:
                raise OptionError(
                    f"probe {self.name!r} recorded {self.n_neurons} neurons before and now got "
                    f"{n_neurons}; call reset_states() before feeding a different layout"
                )
            per_instance = packed.shape[0] // instances if instances else 0
            if keep is not None:
                per_instance = int(kept[0]) if kept.min() == kept.max() else kept
            elif instances and per_instance * instances != packed.shape[0]:
                raise OptionError(
                    f"{packed.shape[0]} states cannot be split evenly into {instances} instances"
                )
            self._counter.add(packed)  # checks the rows: the store takes them as they are
            if self._store is not None:
                self._store._append_valid(packed)
            self._batches.append((instances, per_instance))
            self._note_states_per_instance(per_instance)
            self._result = None

    def _note_states_per_instance(self, per_instance) -> None:
        """Keep ``states_per_instance`` while every batch has the same; -1 once it varies
        (between batches, or between the instances of one: an array)."""
        if not isinstance(per_instance, int) or self.states_per_instance not in (None, per_instance):
            self.states_per_instance = -1
        else:
            self.states_per_instance = per_instance

    def hold(self) -> None:
        """Keep what is recorded from now on aside until :meth:`commit` counts it or
        :meth:`drop` forgets it: a forward pass that fails midway then leaves no
        probe with a batch the others lack."""
        self._held = []

    def commit(self) -> None:
        """Count and store what was held (see :meth:`hold`), in the order it came."""
        held, self._held = self._held, None
        for packed, n_neurons, instances, keep in held or ():
            self.record_packed(packed, n_neurons, instances, keep)

    def drop(self) -> int:
        """Forget what was held (see :meth:`hold`); return how many batches that was."""
        held, self._held = self._held, None
        return len(held or ())

    def _start(self, n_neurons: int) -> None:
        self.n_neurons = n_neurons
        self._counter = StateCounter(n_neurons)
        if self.keep_states:
            meta = {"name": self.name, **self.metadata}
            if self.channel_axis is not None:
                meta.setdefault("channel_axis", self.channel_axis)
            self._store = StateStore(n_neurons, self.disk_path, meta, overwrite=self._overwrite)
            # Our own store from here on: a reset may replace it.
            self._overwrite = True
            if self.disk_path is not None and self.stale_store_sweep is not None:
                self.stale_store_sweep.sweep()

    def merge(self, other: "AbstractStateCapture | StateCounter") -> None:
        """Add the counts of another capture or counter of the same probe.

        A capture that keeps its raw states takes the other's too (appended
        after its own, instances after its own), so that ``states`` and
        ``counts(index=...)`` agree with the counts; merging into it what has
        no raw states (a counter, a capture that keeps none) is refused."""
        if not isinstance(other, (AbstractStateCapture, StateCounter)):
            raise OptionTypeError(f"merge() takes a capture or a StateCounter of the same probe, got {type(other).__name__}")
        counter = other.counter if isinstance(other, AbstractStateCapture) else other
        if counter is None or counter.total == 0:
            return
        rows = None
        if self.keep_states:
            if not (isinstance(other, AbstractStateCapture) and other.keep_states):
                raise OptionError(
                    f"probe {self.name!r} keeps its raw states, and what is merged into it has none: its states "
                    "and per-instance counts would miss the merged ones. Merge a capture that keeps its states, "
                    "or merge into one built with keep_states=False"
                )
            rows = other._require_store("merge()").read()  # not ``states``: that would mark its store complete
        self._gather_counter()
        with self._record_lock:
            if self.n_neurons is None:
                self._start(counter.n_neurons)
            self._counter.merge(counter)
            self._result = None
            if rows is not None:
                self._store.append(rows)
                self._batches.extend(other._batches)
                self._note_states_per_instance(other.states_per_instance)

    def adopt_summary(self, n_neurons: int, total: int, n_distinct: int, histogram, gather=None, firing=None) -> None:
        """Hold the totals of counts kept elsewhere instead of a counter.

        A sharded run merges each probe's counts on the cluster and sends back
        only the number of states, of distinct states and the histogram of
        the counts (``StateCounter.count_histogram()``): enough for
        ``state_count``, ``distinct_count``, ``entropy`` and ``efficiency``,
        which then equal those of the counter itself; with ``firing`` (the
        per-neuron firing counts) the firing rates too. ``gather()`` returns
        the merged :class:`StateCounter` when the states themselves are asked
        for (``counts()``, ``state_ids()``, ``counter``); it raises a
        ``TensorStateError`` saying why when they cannot be had.
        """
        with self._record_lock:
            self._clear()
            self.n_neurons = int(n_neurons)
            values, multiplicities = histogram
            self._summary = (int(total), int(n_distinct), (np.asarray(values), np.asarray(multiplicities)))
            self._summary_firing = None if firing is None else np.asarray(firing, dtype=np.int64)
            self._gather = gather

    def _gather_counter(self) -> None:
        """Bring the counter that ``adopt_summary`` left elsewhere here (once)."""
        if self._counter is not None or self._summary is None:
            return
        if self._gather is None:
            raise NoStatesError(
                f"probe {self.name!r} holds only the totals of its counts (states, distinct states and "
                "their histogram), not the states themselves"
            )
        counter = self._gather()
        with self._record_lock:
            if self._counter is None:
                self._counter = counter
                self._summary = None

    def attach_store(self, store: StateStore, instances: int, states_per_instance: int) -> None:
        """Adopt raw states recorded elsewhere (a sharded run's store) so that
        ``states`` and ``counts(index=...)`` read them; counts are not changed."""
        with self._record_lock:
            self.disk_path = None if store.path is None else Path(store.path)
            self.keep_states = True
            self._store = store
            self._batches = [(int(instances), int(states_per_instance))]

    def flush(self, complete: bool = True) -> None:
        """Write buffered raw states to the store; ``complete`` marks it as
        holding everything recorded (a run that failed passes False)."""
        with self._record_lock:
            if self._store is not None:
                if complete:
                    self._store.mark_complete()
                else:
                    self._store.flush()

    def reset_states(self, input_shape=None) -> None:
        """Forget every recorded state (``input_shape`` is kept for subclasses)."""
        with self._record_lock:
            self.input_shape = input_shape
            self._clear()

    # ------------------------------------------------------------------ queries

    @property
    def state_count(self) -> int:
        """Number of states recorded, repeats included."""
        if self._summary is not None:
            return self._summary[0]
        return 0 if self._counter is None else self._counter.total

    @property
    def distinct_count(self) -> int:
        """Number of distinct states recorded."""
        if self._summary is not None:
            return self._summary[1]
        return 0 if self._counter is None else self._counter.n_distinct

    @property
    def counter(self) -> StateCounter | None:
        """The streaming counter (None before the first record); for counts a
        sharded run left on the cluster, gathered from there on first use."""
        self._gather_counter()
        return self._counter

    @property
    def states(self):
        """The raw packed states as a zarr array ``uint8 (state_count, ceil(C/8))``."""
        store = self._require_store("states")
        self.flush()
        return store.array

    def _require_store(self, what: str) -> StateStore:
        self._require_states()
        if self._store is None:
            raise NoStatesError(
                f"{what} needs the raw states, which probe {self.name!r} does not keep; "
                "pass a storage path (or keep_states=True) when building the model"
            )
        return self._store

    def _require_states(self) -> None:
        if self.state_count == 0:
            raise NoStatesError(
                f"probe {self.name!r} has recorded no states yet; run data through the model first"
            )

    def _instance_rows(self, index) -> np.ndarray:
        # ``per`` is the states of every instance of a batch, or one count per instance (masked).
        pers = np.concatenate([np.broadcast_to(np.asarray(per, np.int64), (n,)) for n, per in self._batches])
        starts = np.concatenate([[0], np.cumsum(pers)[:-1]]).astype(np.int64)
        given = np.asarray(index).ravel()
        if given.size == 0:
            raise OptionError("index selects no input instance")
        if given.dtype.kind not in "ui":
            raise OptionError(f"index selects input instances by integer position, got {index!r}")
        index = given.astype(np.int64)
        n = starts.size
        if index.min() < -n or index.max() >= n:
            raise IndexOutOfRangeError(f"instance index out of range: {n} instances were recorded")
        index %= n
        return np.concatenate([np.arange(starts[i], starts[i] + pers[i]) for i in index])

    def _counts_for(self, index) -> tuple[np.ndarray, np.ndarray]:
        if index is None:
            self._require_states()
            self._gather_counter()
            if self._result is None:
                self._result = self._counter.result()
            return self._result
        store = self._require_store("counts(index=...)")
        self.flush()
        counter = StateCounter(self.n_neurons)
        counter.add(store.read(self._instance_rows(index)))
        return counter.result()

    def counts(self, index=None) -> np.ndarray:
        """Occurrences of each observed state; ``index`` selects input instances."""
        if index is None and self._result is None:
            self._require_states()
            self._gather_counter()
            return self._counter.counts()  # aligned with state_ids(), without building the states
        return self._counts_for(index)[1]

    def state_ids(self, index=None) -> list[bytes]:
        """The observed states as bytes, aligned with :meth:`counts`."""
        return [row.tobytes() for row in self._counts_for(index)[0]]

    def max_entropy(self) -> float:
        """The number of neurons: the entropy if every pattern were equally likely."""
        if self.n_neurons is None:
            self._require_states()
        return float(self.n_neurons)

    def entropy(self, alpha: float | None = 1) -> float:
        """Rényi entropy (bits) of the observed states; ``None`` gives ``max_entropy()``."""
        if alpha is None:
            return self.max_entropy()
        self._require_states()
        if self._summary is not None:
            return metrics.histogram_entropy(*self._summary[2], alpha)
        return metrics.histogram_entropy(*self._counter.count_histogram(), alpha)

    def efficiency(self, alpha1: float = 1, alpha2: float | None = None) -> float:
        """``entropy(alpha1) / (max_entropy() if alpha2 is None else entropy(alpha2))``.

        A probe that saw a single state has every Rényi entropy 0; its
        efficiency is 0. ``alpha2`` must be smaller than ``alpha1``, as in
        TensorState 0.4, so that the ratio lies in [0, 1].
        """
        metrics.check_efficiency_orders(alpha1, alpha2)
        numerator = self.entropy(alpha1)
        denominator = self.entropy(alpha2)
        return 0.0 if denominator == 0 else numerator / denominator

    def firing_counts(self) -> np.ndarray:
        """Per neuron, the number of recorded states in which it fires (``int64[C]``).

        Computed from the distinct states and their counts (no raw states
        needed): each distinct state's bits, weighted by how often it was seen.
        """
        if self._counter is None and self._summary_firing is not None:
            return self._summary_firing.copy()
        ids, counts = self._counts_for(None)
        return firing_counts_of(ids, counts, self.n_neurons)

    def firing_rates(self) -> np.ndarray:
        """Per neuron, the fraction of recorded states in which it fires (``float64[C]``):
        0 for a dead neuron, 1 for one that always fires."""
        return self.firing_counts() / self.state_count

    def dead_neurons(self) -> np.ndarray:
        """Indices of the neurons that fired in no recorded state."""
        return np.flatnonzero(self.firing_counts() == 0)

    def always_firing(self) -> np.ndarray:
        """Indices of the neurons that fired in every recorded state."""
        return np.flatnonzero(self.firing_counts() == self.state_count)

    @property
    def n_bytes(self) -> int | None:
        """Bytes of one packed state."""
        return None if self.n_neurons is None else n_bytes_for(self.n_neurons)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, neurons={self.n_neurons}, "
            f"states={self.state_count})"
        )


class StateCaptureProbe(AbstractStateCapture):
    """A capture fed directly with numpy tensors (the ONNX path and plain use)."""


def positions_kept(mask: np.ndarray | None, n_states: int, instances: int, probe_name: str) -> np.ndarray | None:
    """Which of a batch's ``n_states`` states to record under ``mask`` (``[batch, length]``,
    true where real): all of them when the probe has one state per sample, those of
    the true positions when it has one state per position, in ``[batch, length,
    features]`` or with the positions flattened (``[batch * length, features]``, as
    mixture-of-experts layers see tokens)."""
    if mask is None:
        return None
    if n_states == mask.size and instances in (mask.shape[0], mask.size):  # one state per position
        return mask.reshape(-1)
    if n_states == instances:  # one state per sample: the mask does not apply
        return None
    raise ModelInputError(
        f"the mask of shape {mask.shape} does not fit probe {probe_name!r}, which gives {n_states} states "
        f"for {instances} sample{'s' if instances != 1 else ''}; masks apply to probes with one state per "
        "sample or per position ([batch, length, features]): exclude this probe or run without the mask"
    )


def firing_counts_of(ids: np.ndarray, counts: np.ndarray, n_neurons: int) -> np.ndarray:
    """Per neuron, in how many states it fires: each distinct packed state ``ids[k]``
    weighted by ``counts[k]`` (``int64[n_neurons]``)."""
    return weighted_bit_counts(ids, np.asarray(counts), n_neurons)
