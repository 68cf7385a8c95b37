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
from .errors import IndexOutOfRangeError, NoStatesError, OptionError
from .store import StateStore

__all__ = ["AbstractStateCapture", "StateCaptureProbe"]


class AbstractStateCapture(abc.ABC):
    """Records the firing states of one probed tensor and computes its entropy.

    Args:
        name: the probe's name, unique within a model.
        disk_path: directory of a zarr store for the raw states. ``None`` keeps
            them in memory (compressed) when ``keep_states`` is true.
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
        self._overwrite = overwrite
        self._record_lock = threading.Lock()
        if self.disk_path is not None:
            StateStore.check_free(self.disk_path, overwrite)
        self._clear()

    def _clear(self) -> None:
        self.n_neurons: int | None = None
        self.states_per_instance: int | None = None
        self._counter: StateCounter | None = None
        self._store: StateStore | None = None
        self._batches: list[tuple[int, int]] = []  # (instances, states per instance)
        self._result: tuple[np.ndarray, np.ndarray] | None = None
        # A sharded run's totals, when the counter stayed on the cluster:
        # (states, distinct states, count histogram) and how to gather it.
        self._summary: tuple[int, int, tuple[np.ndarray, np.ndarray]] | None = None
        self._gather = None

    # ------------------------------------------------------------------ recording

    def record(self, tensor: np.ndarray, channel_axis: int) -> None:
        """Quantize, pack, count and (optionally) store one batch.

        Axis 0 is the batch axis for tensors of rank >= 2 whose channel axis
        is not 0; otherwise the whole tensor is one instance.
        """
        if not self.capture_on:
            return
        tensor = np.asarray(tensor) if not isinstance(tensor, np.ndarray) else tensor
        packed = pack(tensor, channel_axis)
        axis = channel_axis % tensor.ndim
        instances = tensor.shape[0] if tensor.ndim >= 2 and axis != 0 else 1
        self.record_packed(packed, tensor.shape[axis], instances)

    def record_packed(self, packed: np.ndarray, n_neurons: int, instances: int) -> None:
        """Count and store states already packed (by ``engine.pack`` or in an ONNX graph)."""
        if not self.capture_on:
            return
        self._gather_counter()  # more states for counts a sharded run left on the cluster
        with self._record_lock:
            if self.n_neurons is None:
                self._start(int(n_neurons))
            elif n_neurons != self.n_neurons:
                raise OptionError(
                    f"probe {self.name!r} recorded {self.n_neurons} neurons before and now got "
                    f"{n_neurons}; call reset_states() before feeding a different layout"
                )
            per_instance = packed.shape[0] // instances if instances else 0
            if instances and per_instance * instances != packed.shape[0]:
                raise OptionError(
                    f"{packed.shape[0]} states cannot be split evenly into {instances} instances"
                )
            self._counter.add(packed)
            if self._store is not None:
                self._store.append(packed)
            self._batches.append((instances, per_instance))
            if self.states_per_instance is None:
                self.states_per_instance = per_instance
            elif self.states_per_instance != per_instance:
                self.states_per_instance = -1  # varies between batches
            self._result = None

    def _start(self, n_neurons: int) -> None:
        self.n_neurons = n_neurons
        self._counter = StateCounter(n_neurons)
        if self.keep_states:
            meta = {"name": self.name, **self.metadata}
            self._store = StateStore(n_neurons, self.disk_path, meta, overwrite=self._overwrite)
            # Our own store from here on: a reset may replace it.
            self._overwrite = True

    def merge(self, other: "AbstractStateCapture | StateCounter") -> None:
        """Add the counts of another capture or counter of the same probe."""
        counter = other.counter if isinstance(other, AbstractStateCapture) else other
        if counter is None:
            return
        self._gather_counter()
        with self._record_lock:
            if self.n_neurons is None:
                self._start(counter.n_neurons)
            self._counter.merge(counter)
            self._result = None

    def adopt_summary(self, n_neurons: int, total: int, n_distinct: int, histogram, gather=None) -> None:
        """Hold the totals of counts kept elsewhere instead of a counter.

        A sharded run merges each probe's counts on the cluster and sends back
        only the number of states, of distinct states and the histogram of
        the counts (``StateCounter.count_histogram()``): enough for
        ``state_count``, ``distinct_count``, ``entropy`` and ``efficiency``,
        which then equal those of the counter itself. ``gather()`` returns
        the merged :class:`StateCounter` when the states themselves are asked
        for (``counts()``, ``state_ids()``, ``counter``); it raises a
        ``TensorStateError`` saying why when they cannot be had.
        """
        with self._record_lock:
            self._clear()
            self.n_neurons = int(n_neurons)
            values, multiplicities = histogram
            self._summary = (int(total), int(n_distinct), (np.asarray(values), np.asarray(multiplicities)))
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
        starts = []
        offset = 0
        for instances, per in self._batches:
            starts.append(offset + per * np.arange(instances, dtype=np.int64))
            offset += instances * per
        starts = np.concatenate(starts)
        pers = np.concatenate([np.full(n, per, np.int64) for n, per in self._batches])
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
        if self._summary is not None:
            self._require_states()
            return metrics.histogram_entropy(*self._summary[2], alpha)
        return metrics.entropy(self.counts(), alpha)

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
