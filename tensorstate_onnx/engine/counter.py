"""StateCounter: streaming, mergeable counts of packed states.

A front over one of three structures, chosen by the bytes of a state:
:class:`.direct.DirectCounts` (at most 2 bytes: a slot per possible state),
:class:`.keys.KeyRuns` (3..8 bytes: sorted runs of states as uint64 keys) and
:class:`.words.WordRuns` (longer: sorted runs of hashes referring to an arena
of state words). This module checks what comes in, keeps the totals, and
reads and writes the pickle format.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

import numpy as np

from ..errors import OptionError, OptionTypeError
from .arrays import narrowest
from .direct import DirectCounts
from .hashing import key_partition, partition_of, scatter_keys, scatter_rows
from .histogram import histogram_of_counts
from .keys import KeyRuns
from .packing import check_packed, n_bytes_for
from .runset import RunSet
from .tuning import DEFAULT_TUNING, CounterTuning
from .words import WordRuns

__all__ = ["StateCounter"]



_MAX_PARTS = 1 << 31  # parts are ranges of a hash's top 32 bits (see hashing.hash_partition)


class StateCounter:
    """Streaming, mergeable counts of packed states.

    ``add()`` batches of packed states (from :func:`pack`), ``merge()`` other
    counters of the same number of neurons (also after pickling: the pickle
    holds each distinct state once), and read ``result()``. Memory grows with
    the number of distinct states, not with the number of states added: a
    distinct state takes 16 bytes (up to 64 neurons) or its words plus 24
    bytes, at worst about twice over until runs are merged, plus a buffer of
    states not yet counted whose size follows the distinct states (2 MiB to
    32 MiB by default; an eighth of that while states repeat; the first
    buffer grows while its states are new, see :class:`CounterTuning`), and while
    states of 3..8 bytes repeat, an index of up to 3 MiB of the largest run
    (see :class:`CounterTuning`). ``nbytes`` reports it.

    ``tuning`` (a :class:`CounterTuning`; None: the defaults) sets those
    sizes and the other choices that trade speed for memory; it never changes
    the counts. A pickle holds the counts only: a loaded counter has the
    default tuning.

    Order of ``result()``: by default an unspecified but deterministic order
    (for states of up to 64 neurons it is the lexicographic byte order, beyond
    that roughly the order in which states were first seen);
    ``result(sort=True)`` gives lexicographic byte order, the order of
    ``np.unique(packed, axis=0)``, at the cost of a sort.
    """

    # Pickles name the class by its public home, not by the module that
    # defines it: they load whatever the layout of the package, in older
    # versions too (sharded runs ship counters between processes).
    __module__ = "tensorstate_onnx.engine"

    def __init__(self, n_neurons: int, tuning: CounterTuning | None = None):
        if isinstance(n_neurons, bool) or not isinstance(n_neurons, (int, np.integer)) or n_neurons < 1:
            raise OptionError(f"StateCounter needs a positive number of neurons, got {n_neurons!r}")
        if tuning is not None and not isinstance(tuning, CounterTuning):
            raise OptionTypeError(f"StateCounter's tuning must be a CounterTuning or None, got {type(tuning).__name__}")
        self.n_neurons = int(n_neurons)
        self.n_bytes = n_bytes_for(self.n_neurons)
        self.total = 0
        self._tuning = DEFAULT_TUNING if tuning is None else tuning
        self._store = self._new_store()
        self._histogram: tuple[np.ndarray, np.ndarray] | None = None  # of the counts as they stand

    def _new_store(self) -> DirectCounts | KeyRuns | WordRuns:
        if self.n_bytes <= 2:
            return DirectCounts(self.n_bytes)
        if self.n_bytes <= 8:
            return KeyRuns(self.n_bytes, self._tuning)
        return WordRuns(self.n_bytes, self._tuning)

    @property
    def tuning(self) -> CounterTuning:
        """How this counter buffers, chunks, absorbs and merges (never what it counts)."""
        return self._tuning

    @property
    def n_distinct(self) -> int:
        """Number of distinct states seen so far."""
        return self._store.n_distinct()

    @property
    def nbytes(self) -> int:
        """Bytes of counting state held: states, keys, counts and buffers."""
        return self._store.nbytes()

    # What follows only observes how the counts are kept, for tests and
    # tuning: up to 16 neurons (counted directly) there are no runs and no
    # buffer.

    @property
    def n_runs(self) -> int:
        """Sorted runs the distinct states are kept in (one right after ``result()``, if any)."""
        return len(self._store.runs) if isinstance(self._store, RunSet) else 0

    @property
    def n_pending(self) -> int:
        """States added but not counted yet: they wait in the buffer."""
        return self._store.n_pending if isinstance(self._store, RunSet) else 0

    @property
    def buffer_rows(self) -> int:
        """States the buffer gathers, as things stand, before they are counted together."""
        return self._store.buffer_rows() if isinstance(self._store, RunSet) else 0

    @property
    def repeating(self) -> bool:
        """Whether the latest states were mostly ones counted before (the buffer is then small)."""
        return isinstance(self._store, RunSet) and self._store.repeating

    @property
    def n_held(self) -> int:
        """Rows of state words held beyond 64 neurons: the distinct states,
        and states merged away whose rows are not dropped yet (0 up to 64)."""
        return self._store.arena_rows if isinstance(self._store, WordRuns) else 0

    # --------------------------------------------------------------- counting

    def add(self, packed: np.ndarray) -> None:
        """Count a batch of packed states (``uint8 (n, ceil(C/8))``)."""
        packed = check_packed(packed, self.n_neurons, "StateCounter.add()")
        n = packed.shape[0]
        if n == 0:
            return
        self._store.add(packed)
        self.total += n
        self._histogram = None

    def merge(self, other: StateCounter) -> None:
        """Add the counts of ``other`` (same number of neurons) to this counter."""
        self._check_mergeable(other, "merge() takes a StateCounter")
        total = other.total
        self._store.merge(other._store)
        self.total += total
        self._histogram = None

    def merge_many(self, others: Sequence[StateCounter]) -> None:
        """Add the counts of every counter in ``others`` (same number of neurons),
        which are left as they were: one merge of all their states, cheaper than
        :meth:`merge` one counter at a time (each state moves log2 of the number
        of counters times, into buffers allocated once)."""
        others = list(others)
        for other in others:
            self._check_mergeable(other, "merge_many() takes StateCounters")
        if isinstance(self._store, DirectCounts):
            # This counter among others adds its counts as they were before the merge.
            own = self._store.table.copy() if any(other is self for other in others) else None
            for other in others:
                if other is self:
                    self._store.table += own
                else:
                    self._store.merge(other._store)
        else:
            self._store.merge_many([other._store for other in others])
        self.total += sum(other.total for other in others)
        self._histogram = None

    def _check_mergeable(self, other, takes: str) -> None:
        """Refuse what is not a StateCounter (``takes`` says what the caller takes) or
        counts another number of neurons."""
        if not isinstance(other, StateCounter):
            raise OptionTypeError(f"{takes}, got {type(other).__name__}")
        if other.n_neurons != self.n_neurons:
            raise OptionError(
                f"cannot merge counts of {other.n_neurons} neurons into counts of {self.n_neurons}"
            )

    def result(self, sort: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(state_ids uint8 (k, n_bytes), counts int64 (k,))``: row ``i`` of
        ``state_ids`` was seen ``counts[i]`` times; new arrays, each state once.

        Args:
            sort: if True, the states come in lexicographic byte order (the
                order of ``np.unique(packed, axis=0)``). By default the order
                is whatever is cheapest: deterministic for the same data, but
                unspecified (it happens to be byte order up to 64 neurons).
        """
        return self._store.result(sort)

    def counts(self) -> np.ndarray:
        """The counts of :meth:`result` (same order) without building the
        states: all that entropy and efficiency need."""
        return self._store.counts()

    def count_histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """``(values, multiplicities)``, both int64: ``multiplicities[i]``
        distinct states were seen exactly ``values[i]`` times (values
        ascending, each at least 1). Every Rényi entropy follows from it
        (:func:`tensorstate_onnx.metrics.histogram_entropy`), and histograms of
        counters holding disjoint states add up, which is what lets a sharded
        run compute entropies without bringing the states together."""
        if self._histogram is None:  # kept until the counts change: every alpha's entropy reads it
            self._histogram = histogram_of_counts(self._store.held_counts())
        values, multiplicities = self._histogram
        return values.copy(), multiplicities.copy()

    def partition(self, n_parts: int) -> list[StateCounter]:
        """Split the counts into ``n_parts`` new counters by a hash of each
        state (:func:`.hashing.partition_of`): every state goes to exactly one
        of them with its count, the same one in every process, so partition
        ``j`` of many counters can be merged apart from the other partitions.
        This counter is not changed; the parts have its tuning."""
        if isinstance(n_parts, bool) or not isinstance(n_parts, (int, np.integer)) or not 1 <= n_parts <= _MAX_PARTS:
            raise OptionError(f"partition() needs a number of parts from 1 to {_MAX_PARTS:,}, got {n_parts!r}")
        n_parts = int(n_parts)
        store = self._store
        if isinstance(store, KeyRuns):
            return self._partition_keys(n_parts)
        if isinstance(store, WordRuns) and store.splits_by_key():
            return self._partition_words(n_parts)
        ids, counts = store.result() if isinstance(store, DirectCounts) else store.pickled()
        which = partition_of(ids, n_parts)
        # Rows of each part together, in the order the store gave them.
        bounds = np.zeros(n_parts + 1, np.int64)
        np.cumsum(np.bincount(which, minlength=n_parts), out=bounds[1:])
        ids, counts = scatter_rows(ids, counts.astype(np.int64, copy=False), which, bounds)
        parts = []
        for j in range(n_parts):
            part = StateCounter(self.n_neurons, self._tuning)
            if bounds[j + 1] > bounds[j]:
                part._load(ids[bounds[j] : bounds[j + 1]], counts[bounds[j] : bounds[j + 1]].copy())
            parts.append(part)
        return parts

    def _partition_keys(self, n_parts: int) -> list[StateCounter]:
        """:meth:`partition` of states of 3 to 8 bytes, straight from their
        sorted keys (the parts' keys stay sorted)."""
        parts = [StateCounter(self.n_neurons, self._tuning) for _ in range(n_parts)]
        run = self._store.compact()
        if run is None:
            return parts
        which = key_partition(run.keys, n_parts)
        bounds = np.zeros(n_parts + 1, np.int64)
        np.cumsum(np.bincount(which, minlength=n_parts), out=bounds[1:])
        keys, counts = scatter_keys(run.keys, run.counts, which, bounds)
        for j, part in enumerate(parts):
            if bounds[j + 1] > bounds[j]:
                part._store.load_keys(keys[bounds[j] : bounds[j + 1]], counts[bounds[j] : bounds[j + 1]].copy())
                part.total = int(counts[bounds[j] : bounds[j + 1]].sum())
        return parts

    def _partition_words(self, n_parts: int) -> list[StateCounter]:
        """:meth:`partition` of states of more than 8 bytes, straight from the
        run's hashes and the arena's words (each part one run, in order)."""
        parts = [StateCounter(self.n_neurons, self._tuning) for _ in range(n_parts)]
        for part, (hashes, refs, counts, words) in zip(parts, self._store.split(n_parts), strict=True):
            if hashes.size:
                part._store.load_transit(hashes, refs, counts, words)
                part.total = int(counts.sum())
        return parts

    def _load(self, ids: np.ndarray, counts: np.ndarray) -> None:
        """Hold exactly the distinct states ``ids`` (in the order the store's
        ``pickled()`` or a subset of it gives) seen ``counts`` times."""
        if isinstance(self._store, DirectCounts):
            values = ids[:, 0].astype(np.int64)
            if self.n_bytes == 2:
                values = (values << 8) | ids[:, 1]
            self._store.table[values] = counts
        else:
            self._store.load(ids, counts)
        self.total = int(counts.sum())
        self._histogram = None

    # -------------------------------------------------------------- transit
    #
    # Between processes that run the same version of this library (the
    # workers of one sharded run), a counter moves as it is held: its keys,
    # counts and state words, sent by pickle as out-of-band buffers. Neither
    # side converts to packed bytes or rehashes, which costs more than
    # merging the counter does. Pickles, not this, are what may be stored.

    def to_transit(self) -> tuple:
        """This counter's counts as held, for :meth:`from_transit` in a process
        running the same version of this library (a tuple of plain values and
        arrays; the arrays are shared with this counter, which must not count
        more while they are being sent). Not a format to store: use pickle."""
        store = self._store
        # The default tuning goes as None: pickling it per counter cost more than its arrays.
        head = (self.n_neurons, self.total, None if self._tuning is DEFAULT_TUNING else self._tuning)
        if isinstance(store, DirectCounts):
            return (*head, "direct", store.pickled())
        return (*head, "runs", store.transit())

    @classmethod
    def from_transit(cls, form: tuple) -> StateCounter:
        """The counter that :meth:`to_transit` gave ``form`` of (its arrays are
        used as they are when writable, else copied)."""
        n_neurons, total, tuning, kind, held = form
        counter = cls(n_neurons, tuning)
        counter.total = int(total)
        if kind == "direct":
            counter._store.fill(held)
        else:
            counter._store.load_transit(*held)
        return counter

    # ------------------------------------------------------------- pickling
    #
    # Sharded runs ship counters between processes: each distinct state
    # once, as its packed bytes, with counts in the narrowest dtype that
    # holds them; hashes and order are rebuilt when loaded. The state keeps
    # the keys and values that earlier versions wrote and read (the counter
    # was then one flat object), so pickles load across versions.

    def pickle_with_states(self) -> tuple[bytes, np.ndarray, np.ndarray]:
        """``(pickle, state_ids, counts)``: a pickle that loads as this counter
        (as ``pickle.dumps(counter)`` does, for this version of the library),
        and the distinct states and their counts as :meth:`result` gives them
        (in another order beyond 16 neurons), from one conversion of the held
        states where each would make its own (a sharded run keeps the pickle
        and sums the states up)."""
        if isinstance(self._store, DirectCounts):
            return pickle.dumps(self, protocol=5), *self._store.result()
        ids, counts = self._store.pickled()
        blob = pickle.dumps(_PickledAs(self._runs_state(ids, counts)), protocol=5)
        return blob, ids, counts

    def __getstate__(self) -> dict:
        if isinstance(self._store, DirectCounts):
            state = {"n_neurons": self.n_neurons, "n_bytes": self.n_bytes, "total": self.total}
            return {**state, "_small": True, "_direct": self._store.pickled()}
        return self._runs_state(*self._store.pickled())

    def _runs_state(self, ids: np.ndarray, counts: np.ndarray) -> dict:
        """The pickled state of a counter of more than 16 neurons holding
        ``ids`` seen ``counts`` times (its store's ``pickled()``)."""
        store = self._store
        state = {"n_neurons": self.n_neurons, "n_bytes": self.n_bytes, "total": self.total}
        # How the buffer flowed when pickled, read before counting what it holds.
        flow = {"_repeating": store.repeating, "_next_check": store.next_check}
        return {
            **state,
            "_small": False,
            "_n_words": store.n_words,
            "_runs": (np.ascontiguousarray(ids), narrowest(counts)),
            **flow,
            "_n_pending": 0,
            "_pending": None,
            "_arena": None,
            "_arena_rows": 0,
        }

    def __setstate__(self, state: dict) -> None:
        self.n_neurons = state["n_neurons"]
        self.n_bytes = state["n_bytes"]
        self.total = state["total"]
        self._tuning = DEFAULT_TUNING
        self._histogram = None
        if state["_small"]:
            self._store = DirectCounts.load(self.n_bytes, state["_direct"])
            return
        # How the buffer flows is not part of the counts (and pickles of older
        # versions lack it): it starts afresh.
        self._store = self._new_store()
        ids, counts = state["_runs"]
        self._store.load(ids, counts.astype(np.int64))


def _restored(state: dict) -> StateCounter:
    """The counter whose pickled state is ``state`` (what
    :meth:`StateCounter.pickle_with_states` pickles calls)."""
    counter = StateCounter.__new__(StateCounter)
    counter.__setstate__(state)
    return counter


class _PickledAs:
    """Pickles as the :class:`StateCounter` whose pickled state is ``state``,
    for a state already built."""

    def __init__(self, state: dict):
        self.state = state

    def __reduce__(self):
        return _restored, (self.state,)
