"""StateCounter: streaming, mergeable counts of packed states."""

from __future__ import annotations

import numba
import numpy as np

from ..errors import OptionTypeError
from .arrays import as_words, held_bytes, trimmed
from .hashing import dedup_words, hash_rows, in_run_order
from .packing import check_packed, n_bytes_for
from .runs import (
    UNIT,
    Run,
    absorb_kernel,
    close_gaps,
    count_known,
    count_sorted_keys,
    keep_rows,
    merge_runs,
)
from .sort import lex_order, sort_keys
from .tuning import DEFAULT_TUNING, CounterTuning

__all__ = ["StateCounter"]

# How states are counted
#
# States of at most two bytes are counted directly (a bincount over 2**16
# values). Longer states are counted in *runs*: distinct states with their
# counts, sorted by a 64-bit key. A batch (or a buffer of small batches) becomes
# one run by a sort-based dedup: numpy's vectorized sort of uint64 keys, then a
# linear pass. Runs are merged pairwise LSM-style (a binary counter: a run is
# merged into the one before it once it is at least half that run's size), so
# merging is sequential, each state is merged O(log(distinct / batch)) times,
# and the runs hold at most about twice the distinct states. A hash table was
# slower here: with millions of distinct states every probe misses the cache.
#
# * States of 3..8 bytes are one big-endian uint64 word: the key is the state
#   itself, exact, and its order is the lexicographic byte order. A dedup is
#   a sort + run lengths, fused with absorbing (below) in one pass over one
#   scratch array; a merge is branch-free. Sorts of 4,096 keys or more
#   are LSD radix sorts that skip digits in which no key differs (the zero low
#   bytes of short states), 1.3-4x faster than np.sort.
# * Longer states are keyed by a 64-bit hash and ordered by (hash, words), so
#   states whose hashes collide are told apart by their words (never merged
#   unless every word is equal). A batch is sorted by hash bits with the row
#   index in the low bits (one sort of uint64 tags, no argsort; the radix sort
#   skips the index bits, which are in order already); rows sharing
#   those hash bits are compared word by word. The words of each distinct state
#   are kept once in an *arena* (copied in the order they arrive); runs hold
#   only (hash, arena row, count), so merges move 24 bytes per state whatever C
#   is. Arena rows of states absorbed are given back at once; those of states
#   merged away are dropped once they are a third of it.

_NO_KEYS = np.empty(0, np.uint64)  # an empty run to count into
_NO_COUNTS = np.empty(0, np.int64)


@numba.njit(cache=True, nogil=True)
def _count_small(packed, counts):
    """Direct counting for states of at most two bytes (index = big-endian value,
    so index order is byte order)."""
    n_bytes = packed.shape[1]
    for i in range(packed.shape[0]):
        v = np.int64(packed[i, 0])
        if n_bytes == 2:
            v = (v << 8) | np.int64(packed[i, 1])
        counts[v] += 1


@numba.njit(cache=True, nogil=True)
def _be_words(packed, out):
    """Each row of up to 8 bytes as one big-endian uint64 (zero padded at the low end)."""
    n_bytes = packed.shape[1]
    shift = np.uint64(8 * (8 - n_bytes))
    for i in range(packed.shape[0]):
        v = np.uint64(0)
        for k in range(n_bytes):
            v = (v << np.uint64(8)) | np.uint64(packed[i, k])
        out[i] = v << shift


@numba.njit(cache=True, nogil=True)
def _be_bytes(keys, out):
    """Inverse of :func:`_be_words`: the first ``out.shape[1]`` bytes of each word."""
    n_bytes = out.shape[1]
    for i in range(keys.size):
        v = keys[i]
        for k in range(n_bytes):
            out[i, k] = np.uint8(v >> np.uint64(56 - 8 * k))


class StateCounter:
    """Streaming, mergeable counts of packed states.

    ``add()`` batches of packed states (from :func:`pack`), ``merge()`` other
    counters of the same number of neurons (also after pickling: the pickle
    holds each distinct state once), and read ``result()``. Memory grows with
    the number of distinct states, not with the number of states added: a
    distinct state takes 16 bytes (up to 64 neurons) or its words plus 24
    bytes, at worst about twice over until runs are merged, plus a buffer of
    states not yet counted whose size follows the distinct states (2 MiB to
    32 MiB by default; an eighth of that while states repeat). ``nbytes``
    reports it.

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
            raise ValueError(f"StateCounter needs a positive number of neurons, got {n_neurons!r}")
        if tuning is not None and not isinstance(tuning, CounterTuning):
            raise OptionTypeError(f"StateCounter's tuning must be a CounterTuning or None, got {type(tuning).__name__}")
        self._tuning = DEFAULT_TUNING if tuning is None else tuning
        self.n_neurons = int(n_neurons)
        self.n_bytes = n_bytes_for(self.n_neurons)
        self.total = 0
        self._small = self.n_bytes <= 2
        if self._small:
            self._direct = np.zeros(1 << (8 * self.n_bytes), np.int64)
            return
        self._n_words = (self.n_bytes + 7) // 8
        # Runs own their count arrays: absorbing adds to them in place.
        self._runs: list[Run] = []
        # Whether the last absorbing try found most states counted already,
        # and the pending rows at which to check the buffer for repeats next.
        self._repeating = False
        self._next_check = 0
        self._n_pending = 0
        # Up to 8 bytes: states waiting to be counted, as big-endian words.
        self._pending: np.ndarray | None = None
        # More than 8 bytes: the arena holds the words of the states the runs
        # refer to (rows [0, _arena_rows)), then the states waiting to be
        # counted (the next _n_pending rows).
        self._arena: np.ndarray | None = None
        self._arena_rows = 0

    @property
    def tuning(self) -> CounterTuning:
        """How this counter buffers, chunks, absorbs and merges (never what it counts)."""
        return self._tuning

    @property
    def n_distinct(self) -> int:
        """Number of distinct states seen so far."""
        if self._small:
            return int(np.count_nonzero(self._direct))
        run = self._compact()
        return 0 if run is None else len(run)

    @property
    def nbytes(self) -> int:
        """Bytes of counting state held: states, keys, counts and buffers."""
        if self._small:
            return self._direct.nbytes
        held = sum(held_bytes(r.keys) + held_bytes(r.refs) + held_bytes(r.counts) for r in self._runs)
        return held + held_bytes(self._pending) + held_bytes(self._arena)

    def add(self, packed: np.ndarray) -> None:
        """Count a batch of packed states (``uint8 (n, ceil(C/8))``)."""
        packed = check_packed(packed, self.n_neurons, "StateCounter.add()")
        n = packed.shape[0]
        if n == 0:
            return
        if self._small:
            _count_small(packed, self._direct)
        elif self._n_words == 1:
            self._add_keys(packed)
        else:
            self._add_words(packed)
        self.total += n

    def _hash(self, words: np.ndarray) -> np.ndarray:
        """The hash of each row of ``words`` that orders long states (see CounterTuning.hash_mask)."""
        hashes = hash_rows(words)
        if self._tuning.hash_mask != DEFAULT_TUNING.hash_mask:
            hashes &= np.uint64(self._tuning.hash_mask)
        return hashes

    def _buffer_rows(self) -> int:
        """States counted together: as many as the largest run holds (so memory
        still follows the distinct states), within the tuning's
        buffer bounds. While states repeat, 1/absorb_ratio of that: the
        buffer is absorbed into the runs, with no merges to amortize."""
        row_bytes = 8 * self._n_words
        largest = len(self._runs[0]) if self._runs else 0
        if self._repeating:
            largest = -(-largest // self._tuning.absorb_ratio)
        rows = min(max(largest, self._tuning.buffer_min_bytes // row_bytes), self._tuning.buffer_max_bytes // row_bytes)
        return max(rows, 64)

    # States of 3..8 bytes: one big-endian word each, sorted and run-length
    # counted; large batches straight from the caller's array, small ones
    # gathered in a buffer first.
    def _add_keys(self, packed: np.ndarray) -> None:
        n = packed.shape[0]
        pos = 0
        while pos < n:
            if self._n_pending == 0:
                cap = self._buffer_rows()
                if n - pos >= cap:
                    take = min(n - pos, self._tuning.chunk_rows)
                    keys = np.empty(take, np.uint64)
                    _be_words(packed[pos : pos + take], keys)
                    self._count_keys(keys, owned=True)
                    pos += take
                    continue
                if self._pending is None or not cap <= self._pending.shape[0] <= 2 * cap:
                    self._pending = None
                    self._pending = np.empty(cap, np.uint64)
            cap = self._pending.shape[0]
            take = min(cap - self._n_pending, n - pos)
            _be_words(packed[pos : pos + take], self._pending[self._n_pending : self._n_pending + take])
            self._n_pending += take
            if self._n_pending == cap or self._repeats_now():
                self._flush()
            pos += take

    # Longer states: large batches are counted straight from the caller's
    # array and their distinct states copied to the arena; small ones are
    # copied to the end of the arena and counted there in place once enough
    # have arrived.
    def _add_words(self, packed: np.ndarray) -> None:
        n = packed.shape[0]
        pos = 0
        while pos < n:
            cap = max(self._buffer_rows(), self._n_pending)
            if self._n_pending == 0 and n - pos >= cap:
                take = min(n - pos, self._tuning.chunk_rows)
                words = as_words(packed[pos : pos + take], self._n_words)
                hashes = self._hash(words)
                rows, counts = dedup_words(words, hashes, UNIT, self._tuning.group_reps)
                start = self._reserve(rows.size)
                refs = np.empty(rows.size, np.int64)
                keep_rows(words, rows, self._arena, start, refs)
                self._arena_rows += rows.size
                self._push_rows(Run(hashes[rows], refs, counts), start)
                pos += take
                continue
            if self._n_pending == 0:  # room for the whole buffer at once: one copy, not one per batch
                self._fit_arena(self._arena_rows + cap, slack=1.5)
                self._reserve(cap)
            take = min(cap - self._n_pending, n - pos)
            start = self._reserve(self._n_pending + take) + self._n_pending
            as_bytes = self._arena[start : start + take].view(np.uint8)
            as_bytes[:, : self.n_bytes] = packed[pos : pos + take]
            if self.n_bytes % 8:
                as_bytes[:, self.n_bytes :] = 0
            self._n_pending += take
            if self._n_pending >= cap or self._repeats_now():
                self._flush()
            pos += take

    def _reserve(self, rows: int) -> int:
        """Room for ``rows`` arena rows after the counted ones; returns the first."""
        need = self._arena_rows + rows
        if self._arena is None:
            self._arena = np.empty((max(need, 64), self._n_words), np.uint64)
        elif need > self._arena.shape[0]:
            # Growing by half at least keeps copies amortized (and below the
            # 1.5x at which _fit_arena gives room back); pages of the new
            # array are only backed once written.
            size = max(need + need // 4, self._arena.shape[0] * 3 // 2)
            arena = np.empty((size, self._n_words), np.uint64)
            used = self._arena_rows + self._n_pending
            arena[:used] = self._arena[:used]
            self._arena = arena
        return self._arena_rows

    def _fit_arena(self, need: int, slack: float) -> None:
        """Give back the arena's room beyond ``need`` rows and a quarter when
        it holds more than ``slack`` times that: after the buffer shrank (1.5,
        so a buffer that shrinks and grows back copies rarely), or once
        everything is counted (1). No rows are pending when this runs."""
        arena = self._arena
        rows = max(64, need + need // 4)
        if arena is not None and arena.shape[0] > slack * rows:
            self._arena = np.empty((rows, self._n_words), np.uint64)
            self._arena[: self._arena_rows] = arena[: self._arena_rows]

    def _repeats_now(self) -> bool:
        """Whether the buffer, filling while states were new, now holds mostly
        states the runs know (see CounterTuning.sample_rows)."""
        n = self._n_pending
        if self._repeating or n < self._next_check or not self._runs or self._tuning.absorb_ratio * n < len(self._runs[0]):
            return False
        self._next_check = n - (-len(self._runs[0]) // self._tuning.absorb_ratio)
        size = min(n, self._tuning.sample_rows)
        if self._n_words == 1:
            recent = np.sort(self._pending[n - size : n])
        else:
            end = self._arena_rows + n
            recent = np.sort(self._hash(self._arena[end - size : end]))
        self._repeating = self._mostly_known(recent)
        return self._repeating

    def _mostly_known(self, sorted_keys: np.ndarray) -> bool:
        """Whether the runs hold at least half of ``sorted_keys``."""
        known = sum(count_known(sorted_keys, run.keys) for run in self._runs)
        return 2 * known >= sorted_keys.size

    def _absorbing(self, keys: np.ndarray, final: bool) -> bool:
        """Whether the new run of sorted ``keys`` first gives the runs the
        counts of the states they hold (see CounterTuning.absorb_ratio): always when all
        runs are about to be merged into one (``final``), which copies more
        than any absorbing; else when it holds at least 1/absorb_ratio as
        many states as the largest run and most of a sample of its keys are
        known (then states repeat: see _buffer_rows)."""
        if not self._runs:
            return False
        if final:
            return True
        if self._tuning.absorb_ratio * keys.size < len(self._runs[0]):
            return False
        self._repeating = self._mostly_known(keys[:: -(-keys.size // self._tuning.sample_rows)])
        return self._repeating

    def _flush(self, weights: np.ndarray = None, final: bool = False) -> None:
        """Count the pending states (``weights``: how often each was seen;
        ``final``: all runs are about to be merged into one)."""
        n = self._n_pending
        self._next_check = 0
        if n == 0:
            return
        self._n_pending = 0
        if self._n_words == 1:
            self._count_keys(self._pending[:n], owned=False, final=final)
            return
        start = self._arena_rows
        tail = self._arena[start : start + n]
        hashes = self._hash(tail)
        rows, counts = dedup_words(tail, hashes, UNIT if weights is None else weights, self._tuning.group_reps)
        keys = hashes[rows]
        refs = np.empty(rows.size, np.int64)
        # Keep one row of each state, in place, in arena order.
        keep_rows(tail, rows, self._arena, start, refs)
        del tail
        self._arena_rows = start + rows.size
        self._push_rows(Run(keys, refs, counts), start, final)

    def _count_keys(
        self, keys: np.ndarray, weights: np.ndarray = UNIT, owned: bool = False, final: bool = False
    ) -> None:
        """Count states that are their own keys: counts of states a run holds
        are added to it in place (see CounterTuning.absorb_ratio), the others become a run.

        Unweighted ``keys`` are sorted in place and overwritten (``owned``: a
        fresh array the run may keep); weighted ones are another counter's run
        (sorted, distinct) and are only read. Sorting, run-length counting and
        absorbing share one scratch array (it ends up holding the counts), so
        a flush of a full buffer needs one buffer's worth of memory beside it
        rather than five."""
        if weights.size:
            absorbing = self._absorbing(keys, final)
            if not absorbing:
                # Keys are never written once in a run, so sharing them is safe; counts are.
                self._append(Run(keys, None, weights.copy()))
                return
            out, owned = np.empty(keys.size, np.uint64), True
            counts = np.empty(keys.size, np.int64)
        else:
            counts = np.empty(keys.size, np.int64)
            sort_keys(keys, 0, counts.view(np.uint64))
            out = keys
            absorbing = self._absorbing(keys, final)
        runs = self._runs if absorbing else [Run(_NO_KEYS, None, _NO_COUNTS)]
        m, distinct = count_sorted_keys(keys, weights, runs[0].keys, runs[0].counts, out, counts)
        for run in runs[1:]:  # a sample was mostly known: the rest may be in the smaller runs
            if m == 0:
                break
            m, _ = count_sorted_keys(out[:m], counts[:m], run.keys, run.counts, out, counts)
        if absorbing:
            self._repeating = 2 * m <= distinct
        if m:
            out = trimmed(out, m) if owned else out[:m].copy()
            self._append(Run(out, None, trimmed(counts, m)))

    def _push_rows(self, run: Run, start: int, final: bool = False) -> None:
        """Add a run of new counts whose states are the last arena rows, from
        ``start`` on. Rows of states the runs absorb are given back: the rest
        move down over them."""
        if self._absorbing(run.keys, final):
            kept = self._absorb(run)
            if len(kept) < len(run):
                self._arena_rows = start + close_gaps(self._arena, start, len(run), kept.refs)
            run = kept
        if len(run):
            self._append(run)

    def _append(self, run: Run) -> None:
        """Add a run of states no other run holds, merging runs of similar size."""
        runs = self._runs
        runs.append(run)
        while len(runs) >= 2 and len(runs[-2]) <= 2 * len(runs[-1]):
            last = runs.pop()
            runs[-1] = merge_runs(runs[-1], last, self._arena)
        self._collect()

    def _absorb(self, run: Run) -> Run:
        """Add the counts of the states of ``run`` (of arena rows) that the
        runs hold to them, in place; returns the rest of ``run``."""
        keys = np.empty(len(run), np.uint64)
        refs = np.empty(len(run), np.int64)
        counts = np.empty(len(run), np.int64)
        rest = run
        for held in self._runs:  # a sample was mostly known: what the largest lacks may be in the others
            m = absorb_kernel(
                held.keys, held.refs, held.counts, rest.keys, rest.refs, rest.counts, self._arena,
                keys, refs, counts,
            )  # fmt: skip
            rest = Run(keys[:m], refs[:m], counts[:m])
            if m == 0:
                break
        self._repeating = 2 * len(rest) <= len(run)
        if len(rest) == len(run):
            return run  # nothing absorbed: keep the run, drop the copy
        m = len(rest)
        return Run(trimmed(keys, m), trimmed(refs, m), trimmed(counts, m))

    def _collect(self) -> None:
        """Drop the arena rows of states merged away once they are a third of
        the counted rows (there are no pending rows when this runs)."""
        if self._arena is None:
            return
        live = sum(len(r) for r in self._runs)
        if 3 * (self._arena_rows - live) <= self._arena_rows:
            return
        arena = np.empty((max(64, live + live // 4), self._n_words), np.uint64)
        start = 0
        for i, run in enumerate(self._runs):
            np.take(self._arena, run.refs, axis=0, out=arena[start : start + len(run)])
            self._runs[i] = Run(run.keys, np.arange(start, start + len(run), dtype=np.int64), run.counts)
            start += len(run)
        self._arena = arena
        self._arena_rows = live

    def _compact(self) -> Run | None:
        """Count the pending states and merge all runs into one (returned)."""
        self._flush(final=True)
        self._pending = None
        runs = self._runs
        while len(runs) >= 2:
            last = runs.pop()
            runs[-1] = merge_runs(runs[-1], last, self._arena)
        self._collect()
        self._fit_arena(self._arena_rows, slack=1)
        return runs[0] if runs else None

    def _states(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """``(words (k, n_words), counts (k,), shared)`` of the distinct states
        (more than 8 bytes); ``shared``: the words are a view of the arena."""
        run = self._compact()
        if run is None:
            return np.empty((0, self._n_words), np.uint64), np.empty(0, np.int64), False
        k = len(run)
        if self._arena_rows == k:
            # Every arena row is a state (refs is a permutation): read them in order.
            counts = np.empty(k, np.int64)
            counts[run.refs] = run.counts
            return self._arena[:k], counts, True
        return np.take(self._arena, run.refs, axis=0), run.counts.copy(), False

    def merge(self, other: "StateCounter") -> None:
        """Add the counts of ``other`` (same number of neurons) to this counter."""
        if not isinstance(other, StateCounter):
            raise TypeError(f"merge() takes a StateCounter, got {type(other).__name__}")
        if other.n_neurons != self.n_neurons:
            raise ValueError(
                f"cannot merge counts of {other.n_neurons} neurons into counts of {self.n_neurons}"
            )
        total = other.total
        if self._small:
            self._direct += other._direct
        else:
            run = other._compact()
            if run is not None:
                if self._n_words == 1:
                    self._count_keys(run.keys, run.counts)
                elif other._tuning.hash_mask != self._tuning.hash_mask:
                    # Ordered by another hash: its states are counted afresh, weighted by their counts.
                    k = len(run)
                    words = np.take(other._arena, run.refs, axis=0)
                    self._flush()
                    start = self._reserve(k)
                    self._arena[start : start + k] = words
                    self._n_pending = k
                    self._flush(run.counts)
                else:
                    k = len(run)
                    # Keys are never written once in a run, so they are shared; counts are copied.
                    # When every arena row of ``other`` is a state (always after unpickling), its
                    # rows are copied as they lie, else gathered in run order first.
                    in_place = other._arena_rows == k
                    words = other._arena[:k] if in_place else np.take(other._arena, run.refs, axis=0)
                    counts = run.counts.copy()
                    self._flush()
                    start = self._reserve(k)
                    self._arena[start : start + k] = words
                    self._arena_rows += k
                    refs = start + run.refs if in_place else np.arange(start, start + k, dtype=np.int64)
                    self._push_rows(Run(run.keys, refs, counts), start)
        self.total += total

    def result(self, sort: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(state_ids uint8 (k, n_bytes), counts int64 (k,))``: row ``i`` of
        ``state_ids`` was seen ``counts[i]`` times; new arrays, each state once.

        Args:
            sort: if True, the states come in lexicographic byte order (the
                order of ``np.unique(packed, axis=0)``). By default the order
                is whatever is cheapest: deterministic for the same data, but
                unspecified (it happens to be byte order up to 64 neurons).
        """
        if self._small:
            values = np.flatnonzero(self._direct)
            ids = values.astype(">u2").view(np.uint8).reshape(-1, 2)[:, 2 - self.n_bytes :]
            return np.ascontiguousarray(ids), self._direct[values]
        if self._n_words == 1:
            run = self._compact()
            if run is None:
                return np.empty((0, self.n_bytes), np.uint8), np.empty(0, np.int64)
            ids = np.empty((len(run), self.n_bytes), np.uint8)
            _be_bytes(run.keys, ids)
            return ids, run.counts.copy()
        words, counts, shared = self._states()
        if sort:
            # Big-endian words compare like the bytes they hold.
            order = lex_order(words.byteswap())
            return words.view(np.uint8)[order, : self.n_bytes], counts[order]
        ids = words.view(np.uint8)[:, : self.n_bytes]
        return (ids.copy() if shared or not ids.flags.c_contiguous else ids), counts

    def counts(self) -> np.ndarray:
        """The counts of :meth:`result` (same order) without building the
        states: all that entropy and efficiency need."""
        if self._small:
            return self._direct[np.flatnonzero(self._direct)]
        run = self._compact()
        if run is None:
            return np.empty(0, np.int64)
        if self._n_words > 1 and self._arena_rows == len(run):
            counts = np.empty(len(run), np.int64)  # arena order, as _states() gives
            counts[run.refs] = run.counts
            return counts
        return run.counts.copy()

    def __getstate__(self) -> dict:
        # Sharded runs ship counters between processes: each distinct state
        # once, as its packed bytes, with counts in the narrowest dtype that
        # holds them; hashes and order are rebuilt when loaded.
        state = self.__dict__.copy()
        del state["_tuning"]  # how to count, not what was counted
        if self._small:
            seen = np.flatnonzero(self._direct)
            state["_direct"] = (self._direct.size, seen, _narrowest(self._direct[seen]))
            return state
        state.update(_pending=None, _n_pending=0, _arena=None, _arena_rows=0)
        if self._n_words == 1:
            ids, counts = self.result()  # in key order already
        else:
            # In the run's (hash, words) order, so loading rebuilds the run
            # without sorting (it checks the order and sorts only if it is off).
            run = self._compact()
            if run is None:
                ids, counts = np.empty((0, self.n_bytes), np.uint8), np.empty(0, np.int64)
            else:
                ids = np.take(self._arena, run.refs, axis=0).view(np.uint8)[:, : self.n_bytes]
                counts = run.counts
        state["_runs"] = (np.ascontiguousarray(ids), _narrowest(counts))
        return state

    def __setstate__(self, state: dict) -> None:
        self._tuning = DEFAULT_TUNING
        self.__dict__.update(state)
        if self._small:
            size, seen, counts = state["_direct"]
            self._direct = np.zeros(size, np.int64)
            self._direct[seen] = counts
            return
        # How the buffer flows is not part of the counts (and pickles of older
        # versions lack it): start afresh.
        self._repeating, self._next_check = False, 0
        ids, counts = state["_runs"]
        counts = counts.astype(np.int64)
        self._runs = []
        if ids.shape[0] == 0:
            return
        if self._n_words == 1:
            # result() lists short states in byte order, so the keys are sorted.
            keys = np.empty(ids.shape[0], np.uint64)
            _be_words(ids, keys)
            self._runs = [Run(keys, None, counts)]
        else:
            words = as_words(ids, self._n_words)
            self._reserve(words.shape[0])
            self._arena[: words.shape[0]] = words
            hashes = self._hash(self._arena[: words.shape[0]])
            if in_run_order(hashes, self._arena):
                self._arena_rows = words.shape[0]
                self._runs = [Run(hashes, np.arange(words.shape[0], dtype=np.int64), counts)]
            else:  # not written by __getstate__ above: count the states afresh
                self._n_pending = words.shape[0]
                self._flush(counts)


def _narrowest(counts: np.ndarray) -> np.ndarray:
    """``counts`` in the smallest unsigned dtype that holds them (a pickle is mostly counts of 1)."""
    top = int(counts.max()) if counts.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return counts.astype(dtype)
    return counts
