"""WordRuns: counts of states longer than 8 bytes, kept once in an arena.

A state is keyed by a 64-bit hash of its words and ordered by (hash, words),
so states whose hashes collide are told apart by their words (see
:mod:`.hashing`). The words of each distinct state are kept once in an
*arena*, copied in the order they arrive; runs hold only (hash, arena row,
count), so merges move 24 bytes per state whatever the number of neurons.
Arena rows of states absorbed are given back at once; those of states merged
away are dropped once they are a third of it. Large batches are counted
straight from the caller's array and their distinct states copied to the
arena; small ones are copied to the end of the arena and counted there in
place once enough have arrived -- or, while states repeat, looked up in an
index of the largest run first, so that only the states it lacks are copied.
"""

from __future__ import annotations

import sys

import numpy as np

from . import policy
from .arrays import as_packed, as_words, held_bytes, narrowest, trimmed, writable
from .hashing import dedup_words, hash_part_starts, hash_rows, in_run_order
from .index import KeyIndex
from .jit import kernel
from .runs import UNIT, Run, absorb_kernel, close_gaps, keep_rows, merge_many
from .runset import RunSet
from .sort import lex_order
from .tuning import DEFAULT_TUNING
from .unaligned import padded_words

__all__ = ["WordRuns"]

_CHUNK_BYTES = 1 << 18  # words of rows looked up in the index at a time (at least _MIN_CHUNK_ROWS rows)
_MIN_CHUNK_ROWS = 1024


@kernel
def _counts_up(refs):
    """Whether ``refs`` is 0, 1, 2, ..."""
    for i in range(refs.size):
        if refs[i] != i:
            return False
    return True


class WordRuns(RunSet):
    """Runs of (hash, arena row, count) and the arena of state words.

    The arena holds the words of the states the runs refer to (rows
    ``[0, arena_rows)``), then the states waiting to be counted (the next
    ``n_pending`` rows).
    """

    def __init__(self, n_bytes, tuning):
        super().__init__(n_bytes, tuning)
        self.arena: np.ndarray | None = None
        self.arena_rows = 0
        self._scratch: np.ndarray | None = None  # words of a chunk of rows being looked up in the index

    def nbytes(self) -> int:
        return super().nbytes() + held_bytes(self.arena) + held_bytes(self._scratch)

    def hash(self, words: np.ndarray) -> np.ndarray:
        """The hash of each row of ``words`` that orders states (see CounterTuning.hash_mask)."""
        hashes = hash_rows(words)
        if self.tuning.hash_mask != DEFAULT_TUNING.hash_mask:
            hashes &= np.uint64(self.tuning.hash_mask)
        return hashes

    def add(self, packed: np.ndarray) -> None:
        n = packed.shape[0]
        flat = None  # the rows as one byte array, made when the index first needs it
        pos = 0
        while pos < n:
            index = self.current_index()
            cap = max(self.buffer_rows(), self.n_pending)
            if index is None and self.n_pending == 0 and n - pos >= cap and not self.first_buffer_may_grow():
                take = min(n - pos, self.tuning.chunk_rows)
                words = as_words(packed[pos : pos + take], self.n_words)
                hashes = self.hash(words)
                rows, counts = dedup_words(words, hashes, UNIT, self.tuning.group_reps)
                start = self._reserve(rows.size)
                refs = np.empty(rows.size, np.int64)
                keep_rows(words, rows, self.arena, start, refs)
                self.arena_rows += rows.size
                self._push_rows(Run(hashes[rows], refs, counts), start)
                pos += take
                continue
            if self.n_pending == 0:  # room for the whole buffer at once: one copy, not one per batch
                self._fit(self.arena_rows + cap, slack=1.5)
                self._reserve(cap)
            if index is not None:
                if flat is None:
                    flat = np.ascontiguousarray(packed).reshape(-1)
                pos = self._count_indexed(index, flat, pos, n, cap)
                continue
            take = min(cap - self.n_pending, n - pos)
            start = self._reserve(self.n_pending + take) + self.n_pending
            as_words(packed[pos : pos + take], self.n_words, out=self.arena[start : start + take])
            self.n_pending += take
            pos += take
            if self.repeats_now() or (self.n_pending >= cap and not self.grow_buffer(self.n_pending)):
                self.flush()

    def _count_indexed(self, index: KeyIndex, flat: np.ndarray, pos: int, stop: int, cap: int) -> int:
        """Count a chunk of the rows ``pos..stop`` of packed rows (given
        flattened, ``flat``) through ``index``: those the largest run holds in
        place, the others into the buffer (the arena's tail, room for ``cap``
        rows), counted when it is full. The chunk's words and hashes are made
        first, in a scratch array that stays in cache. Returns the next row."""
        rows = min(stop - pos, max(_MIN_CHUNK_ROWS, _CHUNK_BYTES // (8 * self.n_words)))
        if self._scratch is None or self._scratch.shape[0] < rows:
            self._scratch = None
            self._scratch = np.empty((rows, self.n_words), np.uint64)
        words = self._scratch[:rows]
        padded_words(flat, self.n_bytes, pos, rows, words.view(np.uint8).reshape(-1))
        self._reserve(cap)
        run = self.runs[0]
        done, self.n_pending, found = index.count_rows(
            words, self.hash(words), run.refs, run.counts, self.arena, self.arena_rows, self.n_pending, cap
        )
        self.looked_up(done, found, full=self.n_pending >= cap)
        return pos + done

    # -------------------------------------------------------------- arena

    def _reserve(self, rows: int) -> int:
        """Room for ``rows`` arena rows after the counted ones; returns the first."""
        need = self.arena_rows + rows
        if self.arena is None:
            self.arena = np.empty((policy.first_arena_rows(need), self.n_words), np.uint64)
        elif need > self.arena.shape[0]:
            arena = np.empty((policy.arena_growth(need, self.arena.shape[0]), self.n_words), np.uint64)
            used = self.arena_rows + self.n_pending
            arena[:used] = self.arena[:used]
            self.arena = arena
        return self.arena_rows

    def _fit(self, need: int, slack: float) -> None:
        """Give back the arena's room beyond ``need`` rows (see
        :func:`.policy.arena_shrunk`). No rows are pending when this runs."""
        arena = self.arena
        if arena is None:
            return
        rows = policy.arena_shrunk(need, arena.shape[0], slack)
        if rows is not None:
            self.arena = np.empty((rows, self.n_words), np.uint64)
            self.arena[: self.arena_rows] = arena[: self.arena_rows]

    def _collect(self) -> None:
        """Drop the arena rows of states merged away once they are a third of
        the counted rows (there are no pending rows when this runs)."""
        if self.arena is None:
            return
        live = sum(len(r) for r in self.runs)
        if not policy.collect_due(self.arena_rows, live):
            return
        arena = np.empty((policy.roomy(live), self.n_words), np.uint64)
        start = 0
        for i, run in enumerate(self.runs):
            np.take(self.arena, run.refs, axis=0, out=arena[start : start + len(run)])
            self.runs[i] = Run(run.keys, np.arange(start, start + len(run), dtype=np.int64), run.counts)
            start += len(run)
        self.arena = arena
        self.arena_rows = live

    # --------------------------------------------------------------- runs

    def _recent_keys(self, size: int) -> np.ndarray:
        end = self.arena_rows + self.n_pending
        return self.hash(self.arena[end - size : end])

    def _buffered_keys(self, stop: int, stride: int) -> np.ndarray:
        start = self.arena_rows
        return self.hash(np.ascontiguousarray(self.arena[start : start + stop : stride]))

    def _count_pending(self, n: int, weights: np.ndarray | None, final: bool) -> None:
        start = self.arena_rows
        tail = self.arena[start : start + n]
        hashes = self.hash(tail)
        rows, counts = dedup_words(tail, hashes, UNIT if weights is None else weights, self.tuning.group_reps)
        keys = hashes[rows]
        refs = np.empty(rows.size, np.int64)
        # Keep one row of each state, in place, in arena order.
        keep_rows(tail, rows, self.arena, start, refs)
        del tail
        self.arena_rows = start + rows.size
        self._push_rows(Run(keys, refs, counts), start, final)

    def _push_rows(self, run: Run, start: int, final: bool = False) -> None:
        """Add a run of new counts whose states are the last arena rows, from
        ``start`` on. Rows of states the runs absorb are given back: the rest
        move down over them."""
        if self.absorbing(run.keys, final):
            kept = self._absorb(run)
            if len(kept) < len(run):
                self.arena_rows = start + close_gaps(self.arena, start, len(run), kept.refs)
            run = kept
        if len(run):
            self.append(run)

    def _absorb(self, run: Run) -> Run:
        """Add the counts of the states of ``run`` (of arena rows) that the
        runs hold to them, in place; returns the rest of ``run``."""
        keys = np.empty(len(run), np.uint64)
        refs = np.empty(len(run), np.int64)
        counts = np.empty(len(run), np.int64)
        rest = run
        for held in self.runs:  # a sample was mostly known: what the largest lacks may be in the others
            m = absorb_kernel(
                held.keys, held.refs, held.counts, rest.keys, rest.refs, rest.counts, self.arena,
                keys, refs, counts,
            )  # fmt: skip
            rest = Run(keys[:m], refs[:m], counts[:m])
            if m == 0:
                break
        self.repeating = policy.still_repeating(len(rest), len(run))
        if len(rest) == len(run):
            return run  # nothing absorbed: keep the run, drop the copy
        m = len(rest)
        return Run(trimmed(keys, m), trimmed(refs, m), trimmed(counts, m))

    def compact(self) -> Run | None:
        self.flush(final=True)
        run = self.merge_all()
        self._fit(self.arena_rows, slack=1)
        return run

    def merge(self, other: WordRuns) -> None:
        """Add the counts of ``other``, whose runs and arena are left as they were."""
        run = other.compact()
        if run is None:
            return
        k = len(run)
        if other.tuning.hash_mask != self.tuning.hash_mask:
            # Ordered by another hash: its states are counted afresh, weighted by their counts.
            words = np.take(other.arena, run.refs, axis=0)
            self.flush()
            start = self._reserve(k)
            self.arena[start : start + k] = words
            self.n_pending = k
            self.flush(run.counts)
            return
        # Keys are never written once in a run, so they are shared; counts are copied.
        counts = run.counts.copy()
        self.flush()
        start = self._reserve(k)
        refs = self._copy_rows(other, run, start)
        self.arena_rows += k
        self._push_rows(Run(run.keys, refs, counts), start)

    def _copy_rows(self, other: WordRuns, run: Run, start: int) -> np.ndarray:
        """Copy the states of ``run`` (of ``other``'s arena) to this arena's rows
        from ``start`` on (reserved); return their refs here. When every arena row
        of ``other`` is a state (always after unpickling), its rows are copied as
        they lie, else gathered in run order."""
        k = len(run)
        if other.arena_rows == k:
            self.arena[start : start + k] = other.arena[:k]
            return start + run.refs
        np.take(other.arena, run.refs, axis=0, out=self.arena[start : start + k])
        return np.arange(start, start + k, dtype=np.int64)

    def merge_many(self, others: list[WordRuns]) -> None:
        """Add the counts of every counter in ``others`` (left as they were) in one
        merge: their states are copied into this arena once, then every run merged."""
        alike = [other for other in others if other.tuning.hash_mask == self.tuning.hash_mask]
        for other in others:
            if other.tuning.hash_mask != self.tuning.hash_mask:
                self.merge(other)  # ordered by another hash: counted afresh
        own = self.compact()
        theirs = [(other, run) for other in alike if (run := other.compact()) is not None]
        if not theirs:
            return
        start = self._reserve(sum(len(run) for _, run in theirs))
        runs = [] if own is None else [own]
        for other, run in theirs:
            runs.append(Run(run.keys, self._copy_rows(other, run, start), run.counts))
            start += len(run)
        self.arena_rows = start
        merged = merge_many(runs, self.arena)
        self.runs = [] if merged is None else [merged]
        self._collect()

    # ------------------------------------------------------------ results

    def _states(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """``(words (k, n_words), counts (k,), shared)`` of the distinct
        states; ``shared``: the words are a view of the arena."""
        run = self.compact()
        if run is None:
            return np.empty((0, self.n_words), np.uint64), np.empty(0, np.int64), False
        k = len(run)
        if self.arena_rows == k:
            # Every arena row is a state (refs is a permutation): read them in order.
            counts = np.empty(k, np.int64)
            counts[run.refs] = run.counts
            return self.arena[:k], counts, True
        return np.take(self.arena, run.refs, axis=0), run.counts.copy(), False

    def result(self, sort: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The distinct states as packed rows and their counts, in byte order
        if ``sort``, else in arena order (about the order first seen)."""
        words, counts, shared = self._states()
        if sort:
            # Big-endian words compare like the bytes they hold.
            order = lex_order(words.byteswap())
            return self._packed(np.take(words, order, axis=0)), counts[order]
        return (as_packed(words, self.n_bytes) if shared else self._packed(words)), counts

    def counts(self) -> np.ndarray:
        """The counts of :meth:`result` (unsorted) without building the states."""
        run = self.compact()
        if run is None:
            return np.empty(0, np.int64)
        if self.arena_rows == len(run):
            counts = np.empty(len(run), np.int64)  # arena order, as _states() gives
            counts[run.refs] = run.counts
            return counts
        return run.counts.copy()

    def pickled(self) -> tuple[np.ndarray, np.ndarray]:
        """The distinct states as packed rows and their counts, in the run's
        (hash, words) order, so that :meth:`load` rebuilds the run without
        sorting."""
        run = self.compact()
        if run is None:
            return np.empty((0, self.n_bytes), np.uint8), np.empty(0, np.int64)
        return self._packed(np.take(self.arena, run.refs, axis=0)), run.counts

    def _packed(self, words: np.ndarray) -> np.ndarray:
        """The packed rows of ``words`` (a new array, not the arena's): the
        words' own bytes when the rows are whole words."""
        if self.n_bytes % 8 == 0:
            return words.view(np.uint8)
        return as_packed(words, self.n_bytes)

    def splits_by_key(self) -> bool:
        """Whether the run's keys give each state's partition (the
        :func:`.hashing.hash_partition` of its key is its
        :func:`.hashing.partition_of`): keys are then the canonical hash of the
        words, as on a little-endian host with the default ``hash_mask``."""
        return sys.byteorder == "little" and self.tuning.hash_mask == DEFAULT_TUNING.hash_mask

    def split(self, n_parts: int) -> list[tuple]:
        """The counted states split into ``n_parts`` by their partition (only
        when :meth:`splits_by_key`): for each part, its :meth:`transit` form
        ``(hashes, None, counts, words)`` in run order. Parts are ranges of
        hashes (:func:`.hashing.hash_partition`), so each is a slice of the run:
        no packed bytes are made, nothing is hashed or scattered."""
        run = self.compact()
        if run is None:
            nothing = (np.empty(0, np.uint64), None, np.empty(0, np.int64), np.empty((0, self.n_words), np.uint64))
            return [nothing] * n_parts
        bounds = np.append(np.searchsorted(run.keys, hash_part_starts(n_parts)), len(run))
        words = np.take(self.arena, run.refs, axis=0)
        return [(run.keys[a:b], None, run.counts[a:b], words[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def transit(self) -> tuple:
        """``(hashes, refs, counts, words)`` of the counted states as held, for
        :meth:`load_transit`: ``words`` are arena rows and ``refs`` point into
        them, or are None when the words come in run order."""
        run = self.compact()
        if run is None:
            return np.empty(0, np.uint64), None, np.empty(0, np.int64), np.empty((0, self.n_words), np.uint64)
        if self.arena_rows == len(run):  # every arena row is a state: sent as it lies
            refs = None if _counts_up(run.refs) else run.refs  # rows in run order need no refs
            return run.keys, refs, narrowest(run.counts), self.arena[: self.arena_rows]
        return run.keys, None, narrowest(run.counts), np.take(self.arena, run.refs, axis=0)

    def load_transit(self, hashes: np.ndarray, refs: np.ndarray | None, counts: np.ndarray, words: np.ndarray) -> None:
        """Start from what :meth:`transit` gave (of a counter with this tuning)."""
        k = hashes.size
        if k == 0:
            return
        if words.shape != (k, self.n_words) or counts.shape != (k,) or (refs is not None and refs.shape != (k,)):
            raise RuntimeError(
                f"a counter in transit is inconsistent: {k} hashes, counts {counts.shape}, words "
                f"{words.shape} for {self.n_words} words a state"
            )
        self.arena = writable(words)
        self.arena_rows = k
        refs = np.arange(k, dtype=np.int64) if refs is None else writable(refs)
        self.runs = [Run(writable(hashes), refs, counts.astype(np.int64))]

    def load(self, ids: np.ndarray, counts: np.ndarray) -> None:
        """Start from distinct states ``ids`` seen ``counts`` (int64) times:
        as one run when they come in (hash, words) order (as :meth:`pickled`
        writes them), else counted afresh."""
        if ids.shape[0] == 0:
            return
        k = ids.shape[0]
        self._reserve(k)
        hashes = self.hash(as_words(ids, self.n_words, out=self.arena[:k]))
        if in_run_order(hashes, self.arena):
            self.arena_rows = k
            self.runs = [Run(hashes, np.arange(k, dtype=np.int64), counts)]
        else:
            self.n_pending = k
            self.flush(counts)
