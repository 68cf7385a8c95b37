"""DirectCounts: counts of states of at most two bytes, one slot per
possible state (a bincount over at most 2**16 values)."""

from __future__ import annotations

import numpy as np

from .arrays import narrowest
from .jit import kernel

__all__ = ["DirectCounts"]


@kernel
def _count_small(packed, counts):
    """Direct counting for states of at most two bytes (index = big-endian value,
    so index order is byte order)."""
    n_bytes = packed.shape[1]
    for i in range(packed.shape[0]):
        v = np.int64(packed[i, 0])
        if n_bytes == 2:
            v = (v << 8) | np.int64(packed[i, 1])
        counts[v] += 1


class DirectCounts:
    """How often each possible state of ``n_bytes`` (1 or 2) bytes was seen."""

    def __init__(self, n_bytes: int):
        self.n_bytes = n_bytes
        self.table = np.zeros(1 << (8 * n_bytes), np.int64)

    def n_distinct(self) -> int:
        return int(np.count_nonzero(self.table))

    def nbytes(self) -> int:
        return self.table.nbytes

    def add(self, packed: np.ndarray) -> None:
        """Count a batch of packed states (checked, not empty)."""
        _count_small(packed, self.table)

    def merge(self, other: DirectCounts) -> None:
        self.table += other.table

    def result(self, sort: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The states seen, as packed rows, and their counts: in byte order, sorted or not."""
        values = np.flatnonzero(self.table)
        ids = values.astype(">u2").view(np.uint8).reshape(-1, 2)[:, 2 - self.n_bytes :]
        return np.ascontiguousarray(ids), self.table[values]

    def counts(self) -> np.ndarray:
        return self.table[np.flatnonzero(self.table)]

    def held_counts(self) -> np.ndarray:
        """The counts of the states seen, in no promised order (here a new array)."""
        return self.counts()

    def pickled(self) -> tuple[int, np.ndarray, np.ndarray]:
        """``(slots, states seen, their counts in the narrowest dtype)``."""
        seen = np.flatnonzero(self.table)
        return self.table.size, seen, narrowest(self.table[seen])

    @classmethod
    def load(cls, n_bytes: int, pickled: tuple[int, np.ndarray, np.ndarray]) -> DirectCounts:
        """The counts that :meth:`pickled` wrote."""
        direct = cls(n_bytes)
        direct.fill(pickled)
        return direct

    def fill(self, pickled: tuple[int, np.ndarray, np.ndarray]) -> None:
        """Start from the counts that :meth:`pickled` wrote (this table is empty)."""
        _, seen, counts = pickled
        self.table[seen] = counts
