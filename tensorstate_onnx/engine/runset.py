"""RunSet: distinct states kept as sorted runs, plus states waiting in a
buffer; what the counts of short states (:mod:`.keys`) and of long ones
(:mod:`.words`) share.

A batch (or a buffer of small batches) becomes one run. Runs are merged
pairwise LSM-style, the largest first (see :func:`.policy.merge_due`); a new
run large enough may first be *absorbed*: the counts of the states the runs
already hold are added to them in place, and only its new states stay a run
(see :func:`.policy.absorb_choice`). A hash table of every state was
slower: with millions of distinct states every probe misses the cache. Only
a largest run small enough to stay in the cache is indexed by hash, while
states repeat (see :mod:`.index`): then a state it holds is counted where it
arrives, and only the others wait in the buffer.
"""

from __future__ import annotations

import abc

import numpy as np

from . import policy
from .arrays import held_bytes
from .index import KeyIndex
from .radix import sort_keys
from .runs import Run, count_known, merge_runs
from .tuning import CounterTuning

__all__ = ["RunSet"]


class RunSet(abc.ABC):
    """Runs of distinct states with their counts, and the flow of the buffer.

    Subclasses say how states are buffered, keyed and counted (``add``,
    ``_recent_keys``, ``_count_pending``) and, when runs refer to rows of an
    ``arena``, when those rows are dropped (``_collect``).
    """

    arena: np.ndarray | None = None

    def __init__(self, n_bytes: int, tuning: CounterTuning):
        self.n_bytes = n_bytes
        self.n_words = (n_bytes + 7) // 8
        self.tuning = tuning
        # Runs own their count arrays: absorbing adds to them in place.
        self.runs: list[Run] = []
        # Whether the last absorbing try found most states counted already,
        # and the pending rows at which to check the buffer for repeats next.
        self.repeating = False
        self.next_check = 0
        self.n_pending = 0
        # While states repeat: the largest run and its index (see current_index),
        # and the states looked up in it since the buffer was last counted, and found.
        self._index: tuple[Run, KeyIndex] | None = None
        self._looked = 0
        self._found = 0
        # Rows the first buffer has grown to while its states stayed new, and a
        # sorted sample of the states it held when it last grew (see grow_buffer).
        self._grown_rows = 0
        self._earlier: tuple[np.ndarray, int] | None = None  # (sorted sample, rows it was taken from)

    @property
    def largest(self) -> int:
        """States of the largest run (the first); 0 when there is none."""
        return len(self.runs[0]) if self.runs else 0

    def buffer_rows(self) -> int:
        """States to gather before counting them (see :func:`.policy.buffer_rows`;
        more once the first buffer has grown, see :meth:`grow_buffer`)."""
        return max(policy.buffer_rows(self.largest, self.repeating, 8 * self.n_words, self.tuning), self._grown_rows)

    def first_buffer_may_grow(self) -> bool:
        """Whether a full buffer may grow rather than be counted (see :func:`.policy.first_buffer_may_grow`)."""
        return policy.first_buffer_may_grow(self.largest, self.repeating, 8 * self.n_words)

    def n_distinct(self) -> int:
        run = self.compact()
        return 0 if run is None else len(run)

    def nbytes(self) -> int:
        """Bytes of the runs, of the index and of the arrays that subclasses hold."""
        index = 0 if self._index is None else self._index[1].nbytes
        return index + sum(held_bytes(r.keys) + held_bytes(r.refs) + held_bytes(r.counts) for r in self.runs)

    # ------------------------------------------------------------ decisions

    def repeats_now(self) -> bool:
        """Whether the buffer, filling while states were new, now holds mostly
        states the runs know (or, before there is a run, mostly states it
        holds already): then it is counted at once and the next buffers are
        small (see :func:`.policy.sample_due` and
        :func:`.policy.first_sample_due`)."""
        n = self.n_pending
        if policy.first_sample_due(n, self.next_check, self.largest, self.tuning):
            # No run to look states up in yet: do the latest repeat among themselves,
            # or (in a grown buffer) the states it held when it last grew?
            self.next_check = policy.next_first_sample_at(n, self._earlier is not None, self.tuning)
            recent = self._sorted_recent(policy.sample_size(n, self.tuning))
            distinct = int(np.count_nonzero(recent[1:] != recent[:-1])) + 1
            repeats_earlier = self._earlier is not None and not self._new_to(recent, self._earlier)
            self.repeating = policy.repeats_within(distinct, recent.size) or repeats_earlier
            return self.repeating
        if not policy.sample_due(n, self.next_check, self.repeating, self.largest, self.tuning):
            return False
        self.next_check = policy.next_sample_at(n, self.largest, self.tuning)
        recent = self._sorted_recent(policy.sample_size(n, self.tuning))
        self.repeating = self.mostly_known(recent)
        return self.repeating

    def _sorted_recent(self, size: int) -> np.ndarray:
        """A sorted copy of the keys of the latest ``size`` pending states."""
        recent = self._recent_keys(size).copy()
        sort_keys(recent)
        return recent

    def grow_buffer(self, rows: int) -> bool:
        """Whether the full buffer of ``rows`` states grows (to as many as
        :meth:`buffer_rows` now says) instead of being counted: only the
        first, while its latest states are nearly all absent from a sample of
        its earlier ones (see :func:`.policy.first_buffer_growth` and
        :func:`.policy.mostly_new`)."""
        grown = policy.first_buffer_growth(rows, self.largest, self.repeating, 8 * self.n_words, self.tuning)
        if grown is None:
            return False
        size = policy.growth_sample_size(rows, self.tuning)
        # At the first growth the latest are looked up in the rest of the buffer.
        earlier = self._earlier if self._earlier is not None else self._sample_of(rows - size, size)
        if not self._new_to(self._sorted_recent(size), earlier):
            return False
        self._earlier = self._sample_of(rows, size)  # what later checks look the latest states up in
        self._grown_rows = grown
        return True

    def _sample_of(self, rows: int, size: int) -> tuple[np.ndarray, int]:
        """About ``size`` keys taken evenly from the first ``rows`` pending states, sorted, and ``rows``."""
        sampled = self._buffered_keys(rows, max(1, rows // size))
        sort_keys(sampled)
        return sampled, rows

    def _new_to(self, latest: np.ndarray, earlier: tuple[np.ndarray, int]) -> bool:
        """Whether the sorted keys ``latest`` are nearly all absent from the
        states ``earlier`` was sampled from (:meth:`_sample_of`; see
        :func:`.policy.mostly_new`)."""
        sampled, rows = earlier
        return policy.mostly_new(count_known(latest, sampled), latest.size, sampled.size, rows, self.tuning)

    def mostly_known(self, sorted_keys: np.ndarray) -> bool:
        """Whether the runs hold at least half of ``sorted_keys``."""
        known = sum(count_known(sorted_keys, run.keys) for run in self.runs)
        return policy.mostly_known(known, sorted_keys.size)

    def absorbing(self, keys: np.ndarray, final: bool) -> bool:
        """Whether the new run of sorted ``keys`` first gives the runs the
        counts of the states they hold (``final``: every run is about to be
        merged into one; see :func:`.policy.absorb_choice`)."""
        choice = policy.absorb_choice(keys.size, self.largest, final, self.tuning)
        if choice is not policy.Absorb.IF_KNOWN:
            return choice is policy.Absorb.YES
        self.repeating = self.mostly_known(keys[:: policy.sample_stride(keys.size, self.tuning)])
        return self.repeating

    # -------------------------------------------------------------- index

    def current_index(self) -> KeyIndex | None:
        """The index of the largest run while states repeat and that run is
        small enough to index (see ``CounterTuning.index_rows``), made anew
        when the run changed; None otherwise."""
        if not (self.repeating and self.runs and len(self.runs[0]) <= self.tuning.index_rows):
            self._index = None
            self._looked = self._found = 0
            return None
        run = self.runs[0]
        if self._index is None or self._index[0] is not run:
            self._index = None  # (the old table goes before the new one is made)
            self._index = (run, KeyIndex(run.keys))
        return self._index[1]

    def looked_up(self, looked: int, found: int, full: bool) -> None:
        """Note that ``found`` of ``looked`` states were found in the index;
        when the buffer of the others is ``full``, count it, and judge whether
        states still repeat by how many of the states looked up since it was
        last counted were found (the flush alone would judge by the buffer,
        which holds only the states that were not)."""
        self._looked += looked
        self._found += found
        if full:
            self.flush()
            self.repeating = policy.mostly_known(self._found, self._looked)
            self._looked = self._found = 0

    # --------------------------------------------------------------- runs

    def append(self, run: Run) -> None:
        """Add a run of states no other run holds, merging runs of similar size."""
        runs = self.runs
        runs.append(run)
        while len(runs) >= 2 and policy.merge_due(len(runs[-2]), len(runs[-1])):
            last = runs.pop()
            runs[-1] = merge_runs(runs[-1], last, self.arena)
        self._collect()

    def flush(self, weights: np.ndarray | None = None, final: bool = False) -> None:
        """Count the pending states (``weights``: how often each was seen;
        ``final``: all runs are about to be merged into one)."""
        n = self.n_pending
        self.next_check = 0
        self._grown_rows = 0
        self._earlier = None
        if n == 0:
            return
        self.n_pending = 0
        self._count_pending(n, weights, final)

    def merge_all(self) -> Run | None:
        """Merge every run into one (returned; None when nothing was counted)."""
        runs = self.runs
        while len(runs) >= 2:
            last = runs.pop()
            runs[-1] = merge_runs(runs[-1], last, self.arena)
        self._collect()
        return runs[0] if runs else None

    def compact(self) -> Run | None:
        """Count the pending states and merge all runs into one (returned)."""
        self.flush(final=True)
        return self.merge_all()

    def held_counts(self) -> np.ndarray:
        """The counts of the distinct states in no promised order, not copied:
        the merged run's own array, to read and never to write (a histogram
        of them needs no copy of millions of counts)."""
        run = self.compact()
        return np.empty(0, np.int64) if run is None else run.counts

    # ------------------------------------------------------ for subclasses

    @abc.abstractmethod
    def add(self, packed: np.ndarray) -> None:
        """Count a batch of packed states (checked, not empty)."""

    @abc.abstractmethod
    def _recent_keys(self, size: int) -> np.ndarray:
        """The keys of the latest ``size`` pending states, unsorted."""

    @abc.abstractmethod
    def _buffered_keys(self, stop: int, stride: int) -> np.ndarray:
        """The keys of every ``stride``-th of the first ``stop`` pending states (a new array)."""

    @abc.abstractmethod
    def _count_pending(self, n: int, weights: np.ndarray | None, final: bool) -> None:
        """Count the ``n`` states that were pending."""

    def _collect(self) -> None:
        """Drop rows no run refers to any more, when that is worth it."""
