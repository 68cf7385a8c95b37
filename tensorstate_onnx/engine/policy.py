"""When a StateCounter flushes its buffer, absorbs a new run, merges runs and
resizes its arena: pure decisions, numbers in and a choice out.

The counter keeps distinct states in sorted *runs*, the largest first, and
gathers small batches in a buffer (see :mod:`.counter`). These functions
decide from sizes alone; the structures that act on them are in
:mod:`.runset`, :mod:`.keys` and :mod:`.words`.
"""

from __future__ import annotations

import enum

from .tuning import CounterTuning

__all__ = [
    "Absorb",
    "absorb_choice",
    "arena_growth",
    "arena_shrunk",
    "buffer_fits",
    "buffer_rows",
    "collect_due",
    "first_arena_rows",
    "first_buffer_growth",
    "first_buffer_may_grow",
    "first_sample_due",
    "growth_sample_size",
    "merge_due",
    "mostly_known",
    "mostly_new",
    "next_first_sample_at",
    "next_sample_at",
    "repeats_within",
    "roomy",
    "sample_due",
    "sample_size",
    "sample_stride",
    "still_repeating",
]

# Fewest rows of a buffer or arena: smaller ones would cost more in calls than in memory.
_MIN_ROWS = 64


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# ------------------------------------------------------------------ buffer


def buffer_rows(largest: int, repeating: bool, row_bytes: int, tuning: CounterTuning) -> int:
    """States gathered before they are counted together: as many as the
    largest run holds (``largest``; 0 when there is none), so that memory
    still follows the distinct states, within the tuning's buffer bounds
    (``row_bytes``: bytes a buffered state takes). While states repeat,
    ``1/absorb_ratio`` of that: the buffer is absorbed into the runs, with no
    merges to amortize."""
    if repeating:
        largest = _ceil_div(largest, tuning.absorb_ratio)
    rows = min(max(largest, tuning.buffer_min_bytes // row_bytes), tuning.buffer_max_bytes // row_bytes)
    return max(rows, _MIN_ROWS)


# Widest buffered state (bytes) for which the first buffer grows: up to 128 neurons
# counting all-distinct states took 1.3-1.6x less time with it; at 320 and 512
# neurons (40- and 64-byte rows) it made no difference (0.89-1.05x), since
# gathering wide rows in hash order out of a large buffer costs what the merges saved.
_GROWN_ROW_BYTES = 16
# Most bytes the first buffer grows to. Grown to 32 MiB, the doubling buffers of
# 22 probes fragmented glibc's heap: benchmarks/memory.py's long pool run then
# peaked 1.2x above the short one (target 1.1); at 8 MiB, 1.04x.
_GROWN_BYTES = 8 << 20


def first_buffer_may_grow(largest: int, repeating: bool, row_bytes: int) -> bool:
    """Whether the buffer is the first (no run yet: ``largest`` 0), states are
    not known to repeat, and a buffered state takes at most 16 bytes (128
    neurons): then a full buffer may grow rather than be counted."""
    return largest == 0 and not repeating and row_bytes <= _GROWN_ROW_BYTES


def first_buffer_growth(rows: int, largest: int, repeating: bool, row_bytes: int, tuning: CounterTuning) -> int | None:
    """Rows that a full first buffer of ``rows`` may grow to (twice as many, at
    most 8 MiB or ``buffer_max_bytes``), or None when it is counted now (see
    :func:`first_buffer_may_grow`). Grown while its states stay new (see
    :func:`mostly_new`), a stream of distinct states is sorted once instead
    of in runs merged again and again: counting 590,000 all-distinct states
    of 32 neurons took 14-19 instead of 20-30 ns a state."""
    if not first_buffer_may_grow(largest, repeating, row_bytes):
        return None
    limit = max(min(tuning.buffer_max_bytes, _GROWN_BYTES) // row_bytes, _MIN_ROWS)
    return min(2 * rows, limit) if rows < limit else None


def growth_sample_size(rows: int, tuning: CounterTuning) -> int:
    """How many of the latest of ``rows`` buffered states are looked up among
    a sample of as many earlier ones before the buffer grows: as many as the
    repeat check looks up (at most half the buffer)."""
    return max(1, min(rows // 2, tuning.sample_rows))


def mostly_new(found: int, sampled: int, earlier_sampled: int, earlier: int, tuning: CounterTuning) -> bool:
    """Whether the latest buffered states are nearly all absent from the
    earlier ones, judged from samples: ``found`` of ``sampled`` latest states
    occur among ``earlier_sampled`` states taken evenly from the ``earlier``.
    If a share ``r`` of the latest repeat an earlier state, about ``sampled *
    r * earlier_sampled / earlier`` are found (more when the earlier ones
    repeat among themselves), so this estimates ``r`` (from above) and asks
    for it to be under ``1/absorb_ratio``: states that repeat more are
    counted sooner by runs, absorbing and the index. Repeats that a sample of
    the latest states alone cannot see, such as a second pass over the same
    data, stop the growth too."""
    return tuning.absorb_ratio * found * earlier < sampled * earlier_sampled


def buffer_fits(allocated: int, wanted: int) -> bool:
    """Whether a buffer of ``allocated`` rows serves for ``wanted``: not
    smaller, and not more than twice as large (memory follows the states)."""
    return wanted <= allocated <= 2 * wanted


# ------------------------------------------------ repeats in a filling buffer


def sample_due(n_pending: int, next_check: int, repeating: bool, largest: int, tuning: CounterTuning) -> bool:
    """Whether to look up the latest of ``n_pending`` buffered states in the
    runs now: while states are new (not ``repeating``), once the buffer holds
    ``1/absorb_ratio`` of the largest run (``largest``; 0: no runs, nothing
    to look up) and has reached ``next_check`` rows."""
    if repeating or n_pending < next_check or largest == 0:
        return False
    return tuning.absorb_ratio * n_pending >= largest


def first_sample_due(n_pending: int, next_check: int, largest: int, tuning: CounterTuning) -> bool:
    """Whether to look for repeats among the latest of ``n_pending`` buffered
    states while no run exists yet (``largest`` 0): at ``sample_rows`` of
    them, then each time the buffer has doubled (``next_check``), so that
    states that repeat from the start are counted into a first run (and from
    then on where they arrive) long before the buffer is full, at a cost
    that stays a small share of sorting the buffer when they do not."""
    return largest == 0 and n_pending >= max(next_check, tuning.sample_rows)


def next_first_sample_at(n_pending: int, grown: bool, tuning: CounterTuning) -> int:
    """Buffered rows at which to look for repeats again while no run exists:
    twice as many, or, once the first buffer has grown (see
    :func:`first_buffer_growth`), ``1/absorb_ratio`` more, as a buffer beside
    a run is checked: a grown buffer is large, and a second pass over the
    same states is seen within an eighth of it rather than when it is full."""
    return n_pending + _ceil_div(n_pending, tuning.absorb_ratio) if grown else 2 * n_pending


def repeats_within(distinct: int, sampled: int) -> bool:
    """Whether ``sampled`` states holding ``distinct`` distinct ones repeat: at most half are distinct."""
    return 2 * distinct <= sampled


def next_sample_at(n_pending: int, largest: int, tuning: CounterTuning) -> int:
    """Buffered rows at which to look again: ``1/absorb_ratio`` of the largest run later."""
    return n_pending + _ceil_div(largest, tuning.absorb_ratio)


def sample_size(n_pending: int, tuning: CounterTuning) -> int:
    """How many of the latest buffered states are looked up."""
    return min(n_pending, tuning.sample_rows)


def mostly_known(known: int, sampled: int) -> bool:
    """Whether ``known`` of ``sampled`` states is at least half."""
    return 2 * known >= sampled


# -------------------------------------------------------------- absorbing


class Absorb(enum.Enum):
    """What a new run does before it joins the runs."""

    NO = "no"  # join as it is
    YES = "yes"  # first add the counts of the states the runs hold to them
    IF_KNOWN = "if known"  # absorb if most of a sample of it is known (see sample_stride)


def absorb_choice(n_new: int, largest: int, final: bool, tuning: CounterTuning) -> Absorb:
    """Whether a new run of ``n_new`` states first gives the runs (the
    largest holding ``largest``; 0: none) the counts of the states they hold.

    Never while the new run is under ``1/absorb_ratio`` of the largest (its
    merge is cheap), unless every run is about to be merged into one
    (``final``); else if a sample of it is mostly known (then states repeat,
    and the buffer shrinks). A final run of new states is merged at once:
    looking each up first would only add to the merge that copies the
    largest run anyway."""
    if largest == 0:
        return Absorb.NO
    if final:
        return Absorb.IF_KNOWN
    if tuning.absorb_ratio * n_new < largest:
        return Absorb.NO
    return Absorb.IF_KNOWN


def sample_stride(n_new: int, tuning: CounterTuning) -> int:
    """Every how many keys of a new run of ``n_new`` one is looked up, for
    about ``sample_rows`` of them."""
    return _ceil_div(n_new, tuning.sample_rows)


def still_repeating(n_left: int, n_distinct: int) -> bool:
    """After absorbing ``n_distinct`` states of which ``n_left`` were new:
    whether states still mostly repeat."""
    return 2 * n_left <= n_distinct


# ----------------------------------------------------------------- merging


def merge_due(before_last: int, last: int) -> bool:
    """Whether the last run (``last`` states) is merged into the one before
    it (``before_last``): once it holds at least half as many (a binary
    counter, so each state is merged O(log(distinct / batch)) times and the
    runs hold at most about twice the distinct states)."""
    return before_last <= 2 * last


# ------------------------------------------------------------------- arena


def first_arena_rows(need: int) -> int:
    """Rows of a first arena for ``need`` rows."""
    return max(need, _MIN_ROWS)


def arena_growth(need: int, capacity: int) -> int:
    """Rows of a new arena when ``need`` rows exceed ``capacity``: a quarter
    more than needed and at least half again as many, so copies stay
    amortized (and below the slack at which :func:`arena_shrunk` gives room
    back); the pages of the new array are only backed once written."""
    return max(need + need // 4, capacity * 3 // 2)


def roomy(need: int) -> int:
    """Rows of an arena rebuilt for ``need`` rows: a quarter more, to grow into."""
    return max(_MIN_ROWS, need + need // 4)


def arena_shrunk(need: int, capacity: int, slack: float) -> int | None:
    """Rows to shrink an arena of ``capacity`` rows to, or None to keep it:
    shrink to :func:`roomy` of ``need`` when it holds more than ``slack``
    times that (1.5 after the buffer shrank, so that a buffer that shrinks
    and grows back copies rarely; 1 once everything is counted)."""
    rows = roomy(need)
    return rows if capacity > slack * rows else None


def collect_due(rows: int, live: int) -> bool:
    """Whether arena ``rows`` of which only ``live`` are states of a run are
    rebuilt to drop the others: once those are more than a third."""
    return 3 * (rows - live) > rows
