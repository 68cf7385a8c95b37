"""Hashes of long states and the dedup of a batch in (hash, words) order, against numpy."""

import numpy as np
import pytest

from tensorstate_onnx.engine.arrays import as_words
from tensorstate_onnx.engine.hashing import dedup_words, hash_rows, in_run_order
from tensorstate_onnx.engine.runs import UNIT


def distinct_rows(words, hashes, weights=UNIT, max_reps=8):
    rows, counts = dedup_words(words, hashes, weights, max_reps)
    return rows, counts


@pytest.mark.parametrize("hashes", ["real", "constant", "two values", "low bits"])
@pytest.mark.parametrize("max_reps", [1, 8])
def test_dedup_words_finds_the_distinct_rows_in_hash_then_words_order(hashes, max_reps):
    rng = np.random.default_rng(max_reps)
    pool = rng.integers(0, 256, (300, 13), dtype=np.uint8)
    packed = pool[rng.integers(0, 300, 5000)]
    words = as_words(packed, 2)
    h = {
        "real": hash_rows(words),
        "constant": np.zeros(len(words), np.uint64),
        "two values": (words[:, 0] & np.uint64(1)) << np.uint64(63),
        "low bits": words[:, 1] & np.uint64(5),
    }[hashes]
    rows, counts = distinct_rows(words, h, max_reps=max_reps)
    expected_ids, expected_counts = np.unique(packed, axis=0, return_counts=True)
    assert len(rows) == len(expected_ids) and counts.sum() == len(packed)
    assert {packed[r].tobytes(): int(c) for r, c in zip(rows, counts)} == {
        row.tobytes(): int(c) for row, c in zip(expected_ids, expected_counts)
    }
    assert in_run_order(h[rows], words[rows])
    weights = rng.integers(1, 5, len(words))
    rows, counts = distinct_rows(words, h, weights, max_reps)
    totals = {}
    for row, w in zip(packed, weights):
        totals[row.tobytes()] = totals.get(row.tobytes(), 0) + int(w)
    assert {packed[r].tobytes(): int(c) for r, c in zip(rows, counts)} == totals


def test_in_run_order_needs_distinct_rows_by_hash_then_words():
    words = np.array([[1, 0], [2, 0], [0, 9]], np.uint64)
    assert in_run_order(np.array([4, 4, 7], np.uint64), words)
    assert not in_run_order(np.array([4, 4, 3], np.uint64), words)
    assert not in_run_order(np.array([4, 4, 7], np.uint64), words[[1, 0, 2]])
    assert not in_run_order(np.array([4, 4, 7], np.uint64), words[[0, 0, 2]])



def test_partition_of_depends_on_the_state_alone():
    from tensorstate_onnx.engine.hashing import partition_of

    rng = np.random.default_rng(3)
    rows = rng.integers(0, 256, (1000, 13), dtype=np.uint8)
    which = partition_of(rows, 7)
    assert which.dtype == np.int64 and which.min() >= 0 and which.max() < 7
    assert len(np.unique(which)) == 7  # a hash spreads random states over every part
    # Same state, same part, whatever the batch it comes in or its memory layout.
    again = partition_of(np.ascontiguousarray(rows[::-1]), 7)[::-1]
    assert np.array_equal(which, again)
    assert np.array_equal(partition_of(rows[:, :13].copy(order="F"), 7), which)
    # States of up to 8 bytes are hashed from their big-endian key, as KeyRuns holds them.
    from tensorstate_onnx.engine.hashing import key_partition
    from tensorstate_onnx.engine.keys import be_keys

    short = rows[:, :5]
    assert np.array_equal(partition_of(short, 7), key_partition(be_keys(np.ascontiguousarray(short)), 7))
    assert len(np.unique(partition_of(short, 7))) == 7


@pytest.mark.parametrize("n_parts", [1, 3, 7, 64, 1000, 2**31])
def test_long_states_go_to_ranges_of_their_hashes(n_parts):
    """Parts of states longer than 8 bytes are ranges of hashes (so a run in
    hash order splits into slices)."""
    from tensorstate_onnx.engine.hashing import hash_partition

    rng = np.random.default_rng(n_parts % 97)
    edges = np.array([0, 1, 2**32 - 1, 2**32, 2**63, 2**64 - 2**32, 2**64 - 1], np.uint64)
    hashes = np.sort(np.concatenate([rng.integers(0, 2**64 - 1, 20_000, dtype=np.uint64), edges]))
    which = hash_partition(hashes, n_parts)
    # Exact: floor(top 32 bits * n_parts / 2**32), in Python's integers.
    assert which.tolist() == [(int(h) >> 32) * n_parts >> 32 for h in hashes]
    assert which[0] == 0 and which[-1] == n_parts - 1 and np.all(np.diff(which) >= 0)


@pytest.mark.parametrize("n_parts", [1, 3, 7, 64, 1000])
def test_hash_part_starts_are_the_first_hash_of_each_part(n_parts):
    from tensorstate_onnx.engine.hashing import hash_part_starts, hash_partition

    starts = hash_part_starts(n_parts)
    assert starts[0] == 0 and np.all(np.diff(starts) > 0)
    assert np.array_equal(hash_partition(starts, n_parts), np.arange(n_parts))
    assert np.array_equal(hash_partition(starts[1:] - np.uint64(1), n_parts), np.arange(n_parts - 1))
    # Random hashes spread evenly over the parts.
    sizes = np.bincount(hash_partition(np.random.default_rng(1).integers(0, 2**64 - 1, 200_000, dtype=np.uint64), n_parts))
    assert sizes.size == n_parts and sizes.min() > 0.7 * 200_000 / n_parts
