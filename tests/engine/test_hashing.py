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

