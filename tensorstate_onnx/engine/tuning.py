"""CounterTuning: the sizes and ratios that steer how a StateCounter buffers,
chunks, absorbs and merges. They change its speed and memory, never its counts."""

from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import OptionError, OptionTypeError

__all__ = ["DEFAULT_TUNING", "CounterTuning"]

_HASH_BITS = (1 << 64) - 1


@dataclass(frozen=True)
class CounterTuning:
    """How a :class:`~tensorstate_onnx.engine.StateCounter` counts.

    Attributes:
        chunk_rows: a batch is counted in chunks of at most this many rows,
            which bounds the temporary arrays and keeps enough hash bits above
            the row index of a long state's sort tag.
        buffer_min_bytes, buffer_max_bytes: small batches are gathered in a
            buffer and counted together; its size follows the distinct states
            counted so far (as many as the largest run holds), within these
            bounds. The first buffer (before any run) of states of up to
            128 neurons starts at the smaller and doubles, up to 8 MiB (at
            most the larger), while its latest states are nearly all absent
            from a sample of its earlier ones (see
            :func:`.policy.mostly_new`): a stream of distinct states is then
            sorted once instead of in runs merged again and again, and the
            buffer holds at most about twice as many states as distinct ones
            (a waiting state takes fewer bytes than a counted one: 8 against
            16 up to 64 neurons).
        group_reps: distinct states compared one by one within a group of
            equal hash bits before the group is sorted instead.
        absorb_ratio: a new run holding at least ``1/absorb_ratio`` as many
            states as the largest run first adds the counts of the states the
            runs already hold to them, in place, when a sample of it is mostly
            known; only its new states stay a run. When states repeat (a long
            analysis of data seen before) this spares the merges that would
            copy the largest run, and the buffer shrinks to ``1/absorb_ratio``
            of that run.
        sample_rows: a buffer filling while states are new is checked each
            time it grew by ``1/absorb_ratio`` of the largest run, by looking
            up its latest states (at most this many) in the runs; if most are
            known it is counted at once and the next buffers are small. The
            same number of states is sampled from a new run before absorbing.
        index_rows: while states repeat and the largest run holds at most
            this many, each new state (a long one by its hash) is looked up
            where it arrives in a hash index of that run (12 bytes a slot,
            2 to 4 slots a state: for the default, at most 3 MiB, in the
            cache) and counted in place; only
            the states it does not hold wait in the buffer to be sorted.
            0 never indexes.
        hash_mask: the bits kept of each long state's 64-bit hash (states of
            more than 8 bytes are ordered by hash, then by their words). Fewer
            bits mean more equal hashes, which cost time, never correctness;
            tests narrow it to make states collide.
    """

    chunk_rows: int = 1 << 22
    buffer_min_bytes: int = 1 << 21
    buffer_max_bytes: int = 1 << 25
    group_reps: int = 8
    absorb_ratio: int = 8
    sample_rows: int = 4096
    index_rows: int = 1 << 16
    hash_mask: int = _HASH_BITS

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise OptionTypeError(f"CounterTuning.{field.name} must be an int, got {value!r}")
        if not 1 <= self.chunk_rows <= 1 << 40:
            raise OptionError(f"CounterTuning.chunk_rows must be in 1..2**40, got {self.chunk_rows}")
        for name in ("buffer_min_bytes", "group_reps", "absorb_ratio", "sample_rows"):
            if getattr(self, name) < 1:
                raise OptionError(f"CounterTuning.{name} must be at least 1, got {getattr(self, name)}")
        if self.buffer_max_bytes < self.buffer_min_bytes:
            raise OptionError(
                f"CounterTuning.buffer_max_bytes ({self.buffer_max_bytes}) is below "
                f"buffer_min_bytes ({self.buffer_min_bytes})"
            )
        if not 0 <= self.index_rows <= 1 << 30:
            raise OptionError(f"CounterTuning.index_rows must be in 0..2**30, got {self.index_rows}")
        if not 0 <= self.hash_mask <= _HASH_BITS:
            raise OptionError(f"CounterTuning.hash_mask must be a 64-bit mask, got {self.hash_mask:#x}")


DEFAULT_TUNING = CounterTuning()
