"""The counter's decisions, numbers in and a choice out."""

import pytest

from tensorstate_onnx.engine import CounterTuning
from tensorstate_onnx.engine import policy
from tensorstate_onnx.engine.policy import Absorb

DEFAULT = CounterTuning()
SMALL = CounterTuning(buffer_min_bytes=1 << 12, buffer_max_bytes=1 << 15, absorb_ratio=4, sample_rows=64)


# ------------------------------------------------------------------ buffer


@pytest.mark.parametrize(
    "largest, repeating, expected",
    [
        (0, False, 512),  # no runs yet: the smallest buffer (4 KiB of 8-byte rows)
        (100, False, 512),
        (1000, False, 1000),  # follows the largest run
        (10_000, False, 4096),  # up to the largest buffer (32 KiB)
        (10_000, True, 2500),  # a quarter of the largest run while states repeat
        (1001, True, 512),  # ... never below the smallest buffer
    ],
)
def test_the_buffer_follows_the_largest_run_within_bounds(largest, repeating, expected):
    assert policy.buffer_rows(largest, repeating, 8, SMALL) == expected


def test_the_buffer_holds_at_least_64_rows_and_follows_row_size():
    assert policy.buffer_rows(0, False, 1 << 20, SMALL) == 64
    assert policy.buffer_rows(0, False, 16, DEFAULT) == (1 << 21) // 16
    assert policy.buffer_rows(10**9, False, 16, DEFAULT) == (1 << 25) // 16
    assert policy.buffer_rows(10**6, True, 8, DEFAULT) == (1 << 21) // 8  # an eighth of 10**6 is under 2 MiB
    assert policy.buffer_rows(8 * 10**6, True, 8, DEFAULT) == 10**6


def test_only_the_first_buffer_grows_while_states_are_new_up_to_the_largest_buffer():
    assert policy.first_buffer_growth(512, 0, False, 8, SMALL) == 1024
    assert policy.first_buffer_growth(3000, 0, False, 8, SMALL) == 4096  # capped at 32 KiB of rows
    assert policy.first_buffer_growth(4096, 0, False, 8, SMALL) is None  # already the largest
    assert policy.first_buffer_growth(512, 1, False, 8, SMALL) is None  # a run exists
    assert policy.first_buffer_growth(512, 0, True, 8, SMALL) is None  # states repeat
    assert policy.first_buffer_growth(64, 0, False, 1 << 20, SMALL) is None  # 64 rows of 1 MiB: the floor
    assert policy.first_buffer_growth(512, 0, False, 24, SMALL) is None  # rows of 24 bytes (over 128 neurons)
    assert policy.first_buffer_growth(600_000, 0, False, 8, DEFAULT) == 1 << 20  # 8 MiB, below buffer_max_bytes
    assert policy.first_buffer_growth(1 << 20, 0, False, 8, DEFAULT) is None
    assert policy.first_buffer_may_grow(0, False, 16) and not policy.first_buffer_may_grow(0, True, 16)
    assert not policy.first_buffer_may_grow(0, False, 24)
    assert policy.growth_sample_size(100, SMALL) == 50 and policy.growth_sample_size(10**6, SMALL) == 64


@pytest.mark.parametrize(
    "found, sampled, earlier_sampled, earlier, expected",
    [
        (0, 64, 64, 10_000, True),  # nothing found: all new
        (1, 64, 64, 10_000, False),  # 1 of 64 in a 64/10,000 sample: about every one repeats
        (10, 64, 64, 100, True),  # 10 of 64 found in 64 of the 100 earlier: about 24% repeat
        (11, 64, 64, 100, False),  # about 27%: over a quarter (absorb_ratio 4)
    ],
)
def test_the_latest_states_are_new_when_few_occur_in_a_sample_of_the_earlier(found, sampled, earlier_sampled, earlier, expected):
    assert policy.mostly_new(found, sampled, earlier_sampled, earlier, SMALL) is expected


def test_a_buffer_is_kept_while_neither_too_small_nor_over_twice_too_large():
    assert policy.buffer_fits(100, 100) and policy.buffer_fits(200, 100)
    assert not policy.buffer_fits(99, 100) and not policy.buffer_fits(201, 100)


# ------------------------------------------------ repeats in a filling buffer


def test_a_filling_buffer_is_sampled_once_it_holds_a_share_of_the_largest_run():
    # absorb_ratio 4: a quarter of the largest run (1000 states).
    assert not policy.sample_due(249, 0, False, 1000, SMALL)
    assert policy.sample_due(250, 0, False, 1000, SMALL)
    assert not policy.sample_due(250, 0, True, 1000, SMALL)  # repeats known already
    assert not policy.sample_due(250, 0, False, 0, SMALL)  # nothing to look up in
    assert not policy.sample_due(400, 500, False, 1000, SMALL)  # not yet at the next check
    assert policy.sample_due(500, 500, False, 1000, SMALL)
    assert policy.next_sample_at(250, 1000, SMALL) == 500
    assert policy.next_sample_at(250, 1001, SMALL) == 501
    assert policy.sample_size(250, SMALL) == 64 and policy.sample_size(10, SMALL) == 10


def test_a_first_buffer_is_sampled_at_sample_rows_then_each_time_it_doubled():
    # sample_rows 64 in SMALL; only while there is no run.
    assert not policy.first_sample_due(63, 0, 0, SMALL)
    assert policy.first_sample_due(64, 0, 0, SMALL)
    assert not policy.first_sample_due(64, 0, 10, SMALL)  # a run: sample_due decides
    assert policy.next_first_sample_at(64, False, SMALL) == 128
    assert policy.next_first_sample_at(64, True, SMALL) == 80  # a grown buffer: a quarter more (absorb_ratio 4)
    assert not policy.first_sample_due(127, 128, 0, SMALL) and policy.first_sample_due(128, 128, 0, SMALL)


def test_states_repeat_within_a_sample_when_at_most_half_are_distinct():
    assert policy.repeats_within(32, 64) and policy.repeats_within(1, 5)
    assert not policy.repeats_within(33, 64) and not policy.repeats_within(1, 1)


def test_half_known_is_mostly_known():
    assert policy.mostly_known(32, 64) and policy.mostly_known(3, 5)
    assert not policy.mostly_known(31, 64) and not policy.mostly_known(0, 1)
    assert policy.still_repeating(32, 64) and not policy.still_repeating(33, 64)


# -------------------------------------------------------------- absorbing


@pytest.mark.parametrize(
    "n_new, largest, final, expected",
    [
        (1000, 0, True, Absorb.NO),  # no runs to absorb into
        (1000, 0, False, Absorb.NO),
        (1, 1000, True, Absorb.IF_KNOWN),  # all runs merge next: absorbed only if mostly known
        (5000, 1000, True, Absorb.IF_KNOWN),
        (249, 1000, False, Absorb.NO),  # small: its merge is cheap
        (250, 1000, False, Absorb.IF_KNOWN),
        (5000, 1000, False, Absorb.IF_KNOWN),
    ],
)
def test_absorb_choice(n_new, largest, final, expected):
    assert policy.absorb_choice(n_new, largest, final, SMALL) is expected


def test_a_new_run_is_sampled_about_sample_rows_times():
    assert policy.sample_stride(64, SMALL) == 1
    assert policy.sample_stride(65, SMALL) == 2
    for n in (1, 63, 64, 65, 1000, 10**6):
        stride = policy.sample_stride(n, SMALL)
        assert len(range(0, n, stride)) <= 64 and (stride == 1 or len(range(0, n, stride - 1)) > 64)


# ----------------------------------------------------------------- merging


def simulate_appends(sizes):
    runs = []
    for size in sizes:
        runs.append(size)
        while len(runs) >= 2 and policy.merge_due(runs[-2], runs[-1]):
            last = runs.pop()
            runs[-1] += last
    return runs


@pytest.mark.parametrize("sizes", [[1] * 1000, [7, 3, 100, 1, 1, 1, 50, 2] * 50, list(range(1, 300))])
def test_runs_merge_like_a_binary_counter(sizes):
    runs = simulate_appends(sizes)
    assert sum(runs) == sum(sizes)
    # Each run holds more than twice the next, so there are O(log) of them.
    assert all(a > 2 * b for a, b in zip(runs, runs[1:]))
    assert len(runs) <= sum(sizes).bit_length()


# ------------------------------------------------------------------- arena


def test_arena_sizes():
    assert policy.first_arena_rows(10) == 64 and policy.first_arena_rows(1000) == 1000
    assert policy.arena_growth(1000, 900) == 1350  # half again as many as it had
    assert policy.arena_growth(1000, 100) == 1250  # a quarter more than needed
    assert policy.roomy(10) == 64 and policy.roomy(1000) == 1250
    assert policy.arena_shrunk(1000, 1875, 1.5) is None  # within 1.5x of 1250 rows
    assert policy.arena_shrunk(1000, 1876, 1.5) == 1250
    assert policy.arena_shrunk(1000, 1251, 1) == 1250 and policy.arena_shrunk(1000, 1250, 1) is None


def test_arena_rows_are_collected_once_a_third_is_dead():
    assert not policy.collect_due(900, 600)
    assert policy.collect_due(900, 599)
    assert not policy.collect_due(0, 0)
