"""KeyRuns: counts of states of 3..8 bytes, each state one big-endian uint64
word that is its own key.

The key is exact and its order is the lexicographic byte order, so a run
needs no other data. A batch is sorted (by :func:`.radix.sort_keys`) and
run-length counted, fused with absorbing in one pass over one scratch array; a merge is branch-free. Large batches are counted
straight from the caller's array, small ones gathered in a buffer first.
"""

from __future__ import annotations

import numpy as np

from . import policy
from .arrays import held_bytes, narrowest, trimmed, writable
from .index import KeyIndex
from .jit import kernel
from .radix import sort_keys
from .runs import UNIT, Run, count_sorted_keys, merge_many
from .runset import RunSet
from .unaligned import row_key

__all__ = ["KeyRuns", "be_keys"]

_NO_KEYS = np.empty(0, np.uint64)  # an empty run to count into
_NO_COUNTS = np.empty(0, np.int64)
_INDEX_CHUNK = 8192  # rows whose keys are made, then looked up in the index, at a time (64 KiB)


@kernel
def _be_words(flat, n_bytes, first, out):
    """The keys of rows ``first..first + out.size`` of packed rows of
    ``n_bytes`` (at most 8) bytes, given flattened (``flat``)."""
    for i in range(out.size):
        out[i] = row_key(flat, first + i, n_bytes)


def be_keys(packed: np.ndarray) -> np.ndarray:
    """The key of each packed row of up to 8 bytes: the bytes as one big-endian uint64."""
    keys = np.empty(packed.shape[0], np.uint64)
    _be_words(np.ascontiguousarray(packed).reshape(-1), packed.shape[1], 0, keys)
    return keys


@kernel
def _high_halves(keys, out):
    """The high 32 bits of each key (all its bits, for states of up to 4 bytes)."""
    for i in range(keys.size):
        out[i] = np.uint32(keys[i] >> np.uint64(32))


@kernel
def _from_high_halves(halves, keys):
    """Inverse of :func:`_high_halves` for keys whose low 32 bits are zero."""
    for i in range(halves.size):
        keys[i] = np.uint64(halves[i]) << np.uint64(32)


@kernel
def _be_bytes(keys, out):
    """Inverse of :func:`_be_words`: the first ``out.shape[1]`` bytes of each word."""
    n_bytes = out.shape[1]
    for i in range(keys.size):
        v = keys[i]
        for k in range(n_bytes):
            out[i, k] = np.uint8(v >> np.uint64(56 - 8 * k))


class KeyRuns(RunSet):
    """Runs of states that are their own keys, and a buffer of such keys."""

    def __init__(self, n_bytes, tuning):
        super().__init__(n_bytes, tuning)
        self.pending: np.ndarray | None = None  # states waiting to be counted, as keys
        self._scratch: np.ndarray | None = None  # keys of a chunk of rows being looked up in the index
        self._halves: np.ndarray | None = None  # keys of up to 4 bytes being sorted as 32-bit words

    def nbytes(self) -> int:
        return super().nbytes() + held_bytes(self.pending) + held_bytes(self._scratch) + held_bytes(self._halves)

    def add(self, packed: np.ndarray) -> None:
        n = packed.shape[0]
        flat = np.ascontiguousarray(packed).reshape(-1)
        pos = 0
        while pos < n:
            index = self.current_index()
            if self.n_pending == 0:
                cap = self.buffer_rows()
                if index is None and n - pos >= cap and not self.first_buffer_may_grow():
                    take = min(n - pos, self.tuning.chunk_rows)
                    keys = np.empty(take, np.uint64)
                    _be_words(flat, self.n_bytes, pos, keys)
                    self.count_keys(keys, owned=True)
                    pos += take
                    continue
                if self.pending is None or not policy.buffer_fits(self.pending.shape[0], cap):
                    self.pending = None
                    self.pending = np.empty(cap, np.uint64)
            cap = self.pending.shape[0]
            if index is not None:
                pos = self._count_indexed(index, flat, pos, n)
                continue
            take = min(cap - self.n_pending, n - pos)
            _be_words(flat, self.n_bytes, pos, self.pending[self.n_pending : self.n_pending + take])
            self.n_pending += take
            pos += take
            if self.repeats_now():
                self.flush()
            elif self.n_pending == cap:
                if self.grow_buffer(cap):
                    pending = np.empty(self.buffer_rows(), np.uint64)
                    pending[:cap] = self.pending
                    self.pending = pending
                else:
                    self.flush()

    def _count_indexed(self, index: KeyIndex, flat: np.ndarray, pos: int, stop: int) -> int:
        """Count a chunk of the rows ``pos..stop`` through ``index``: those the
        largest run holds in place, the others into the buffer, counted when
        it is full (and then whether states still repeat is judged by how many
        of the rows looked up since the last time were found). Returns the
        next row. The chunk's keys are made first, into a scratch array that
        stays in cache: a loop that makes and looks them up one by one runs
        slower than the two."""
        if self._scratch is None:
            self._scratch = np.empty(_INDEX_CHUNK, np.uint64)
        keys = self._scratch[: min(stop - pos, _INDEX_CHUNK)]
        _be_words(flat, self.n_bytes, pos, keys)
        done, self.n_pending, found = index.count_keys(keys, 0, self.runs[0].counts, self.pending, self.n_pending)
        self.looked_up(done, found, full=self.n_pending == self.pending.shape[0])
        return pos + done

    def _recent_keys(self, size: int) -> np.ndarray:
        return self.pending[self.n_pending - size : self.n_pending]

    def _buffered_keys(self, stop: int, stride: int) -> np.ndarray:
        return self.pending[:stop:stride].copy()

    def _count_pending(self, n: int, weights: np.ndarray | None, final: bool) -> None:
        if n == self.pending.shape[0]:
            # A full buffer becomes the new run as it is (the next buffer is a
            # new array): cheaper than copying its distinct keys out of it.
            keys, self.pending = self.pending, None
            self.count_keys(keys, owned=True, final=final)
        else:
            self.count_keys(self.pending[:n], owned=False, final=final)

    def count_keys(
        self, keys: np.ndarray, weights: np.ndarray = UNIT, owned: bool = False, final: bool = False
    ) -> None:
        """Count states that are their own keys: counts of states a run holds
        are added to it in place (see :func:`.policy.absorb_choice`), the
        others become a run.

        Unweighted ``keys`` are sorted in place and overwritten (``owned``: a
        fresh array the run may keep); weighted ones are another counter's run
        (sorted, distinct) and are only read. Run-length counting and absorbing
        share one scratch array (it ends up holding the counts), so a flush of
        a full buffer needs one buffer's worth of memory beside it rather than
        four."""
        if weights.size:
            absorbing = self.absorbing(keys, final)
            if not absorbing:
                # Keys are never written once in a run, so sharing them is safe; counts are.
                self.append(Run(keys, None, weights.copy()))
                return
            out, owned = np.empty(keys.size, np.uint64), True
            counts = np.empty(keys.size, np.int64)
        else:
            counts = np.empty(keys.size, np.int64)
            self._sort(keys, scratch=counts)
            out = keys
            absorbing = self.absorbing(keys, final)
        runs = self.runs if absorbing else [Run(_NO_KEYS, None, _NO_COUNTS)]
        m, distinct = count_sorted_keys(keys, weights, runs[0].keys, runs[0].counts, out, counts)
        for run in runs[1:]:  # a sample was mostly known: the rest may be in the smaller runs
            if m == 0:
                break
            m, _ = count_sorted_keys(out[:m], counts[:m], run.keys, run.counts, out, counts)
        if absorbing:
            self.repeating = policy.still_repeating(m, distinct)
        if m:
            out = trimmed(out, m) if owned else out[:m].copy()
            self.append(Run(out, None, trimmed(counts, m)))

    def _sort(self, keys: np.ndarray, scratch: np.ndarray) -> None:
        """Sort ``keys`` in place (``scratch``: as many bytes, overwritten). Keys
        of states of up to 4 bytes (17 to 32 neurons), whose low half is
        zero, sort as 32-bit words: half the bytes, sorted in half the time
        (a layer of 32 mostly distinct states a batch spent most of its
        counting sorting)."""
        if self.n_bytes > 4:
            sort_keys(keys, scratch)
            return
        if self._halves is None or self._halves.size < keys.size:
            self._halves = None  # (the old one goes before the new one is made)
            self._halves = np.empty(keys.size, np.uint32)
        halves = self._halves[: keys.size]
        _high_halves(keys, halves)
        sort_keys(halves, scratch)
        _from_high_halves(halves, keys)
        if self._halves.size > 2 * self.buffer_rows():  # a grown first buffer's: not needed again
            self._halves = None

    def compact(self) -> Run | None:
        self.flush(final=True)
        self.pending = None
        self._halves = None
        return self.merge_all()

    def merge(self, other: KeyRuns) -> None:
        """Add the counts of ``other``, whose run is left as it was."""
        run = other.compact()
        if run is not None:
            self.count_keys(run.keys, run.counts)

    def merge_many(self, others: list[KeyRuns]) -> None:
        """Add the counts of every counter in ``others`` (left as they were) in one merge."""
        runs = [run for run in (self.compact(), *(other.compact() for other in others)) if run is not None]
        merged = merge_many(runs, None)
        self.runs = [] if merged is None else [merged]

    def result(self, sort: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The distinct states as packed rows and their counts: in byte order (the keys' order), sorted or not."""
        run = self.compact()
        if run is None:
            return np.empty((0, self.n_bytes), np.uint8), np.empty(0, np.int64)
        ids = np.empty((len(run), self.n_bytes), np.uint8)
        _be_bytes(run.keys, ids)
        return ids, run.counts.copy()

    def counts(self) -> np.ndarray:
        run = self.compact()
        return np.empty(0, np.int64) if run is None else run.counts.copy()

    def pickled(self) -> tuple[np.ndarray, np.ndarray]:
        """What a pickle holds: :meth:`result`, whose byte order is the order of the keys."""
        return self.result()

    def transit(self) -> tuple[np.ndarray, np.ndarray]:
        """``(keys, counts)`` of the counted states as held (counts narrowed), for :meth:`load_transit`."""
        run = self.compact()
        if run is None:
            return _NO_KEYS, _NO_COUNTS
        return run.keys, narrowest(run.counts)

    def load_transit(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Start from what :meth:`transit` gave."""
        if keys.size:
            self.load_keys(writable(keys), counts.astype(np.int64))

    def load(self, ids: np.ndarray, counts: np.ndarray) -> None:
        """Start from distinct states ``ids`` in byte order (as :meth:`pickled`
        writes them) seen ``counts`` (int64) times."""
        if ids.shape[0] == 0:
            return
        self.load_keys(be_keys(ids), counts)

    def load_keys(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Start from distinct sorted ``keys`` seen ``counts`` (int64, owned from here) times."""
        self.runs = [Run(keys, None, counts)]
