"""Kernels over sorted runs: galloping search, counting into a run, absorbing, merging."""

import numpy as np
import pytest

from tensorstate_onnx.engine.runs import Run, absorb_kernel, count_sorted_keys, gallop, merge_runs


def test_absorb_compares_the_words_of_states_with_equal_hashes():
    arena = np.array([[1, 0], [2, 0], [3, 0], [9, 9], [2, 0], [4, 0], [3, 0]], np.uint64)
    h1, r1, c1 = np.array([5, 5, 5, 8], np.uint64), np.array([0, 1, 2, 3]), np.array([1, 1, 1, 1])
    # Run 2 shares hash 5 with run 1: (2, 0) and (3, 0) are held, (4, 0) is not.
    h2, r2, c2 = np.array([5, 5, 5, 6], np.uint64), np.array([4, 6, 5, 5]), np.array([10, 20, 30, 40])
    order = np.lexsort((arena[r2, 0], h2))
    h2, r2, c2 = h2[order], r2[order], c2[order]
    out_h, out_r, out_c = np.empty(4, np.uint64), np.empty(4, np.int64), np.empty(4, np.int64)
    m = absorb_kernel(h1, r1, c1, h2, r2, c2, arena, out_h, out_r, out_c)
    assert c1.tolist() == [1, 11, 21, 1]
    assert m == 2
    assert out_h[:m].tolist() == [5, 6] and out_r[:m].tolist() == [5, 5] and out_c[:m].tolist() == [30, 40]


@pytest.mark.parametrize("n", [0, 1, 5, 1000])
def test_gallop_finds_what_searchsorted_finds(n):
    rng = np.random.default_rng(n)
    h = np.sort(rng.integers(0, 50, n).astype(np.uint64))
    for start in {0, n // 3, n}:
        for v in range(-1, 52, 3):
            v = np.uint64(max(v, 0))
            expected = start + int(np.searchsorted(h[start:], v, side="left"))
            assert gallop(h, start, v) == expected


def test_counting_sorted_keys_into_a_run_adds_known_states_in_place():
    h1, c1 = np.array([3, 7, 9, 20], np.uint64), np.array([1, 1, 1, 1])
    keys = np.array([1, 3, 3, 8, 9, 9, 9, 25], np.uint64)
    out = np.empty(keys.size, np.int64)
    m, distinct = count_sorted_keys(keys, np.empty(0, np.int64), h1, c1, keys, out)
    assert c1.tolist() == [3, 1, 4, 1]
    assert distinct == 5
    assert m == 3 and keys[:m].tolist() == [1, 8, 25] and out[:m].tolist() == [1, 1, 1]
    keys = np.array([2, 2, 5], np.uint64)
    m, distinct = count_sorted_keys(keys, np.array([1, 2, 3]), np.empty(0, np.uint64), np.empty(0, np.int64), keys, out)
    assert m == distinct == 2 and keys[:m].tolist() == [2, 5] and out[:m].tolist() == [3, 3]


def test_merging_runs_of_keys_adds_the_counts_of_equal_keys():
    a = Run(np.array([1, 4, 9], np.uint64), None, np.array([1, 2, 3]))
    b = Run(np.array([0, 4, 10], np.uint64), None, np.array([5, 6, 7]))
    merged = merge_runs(a, b, None)
    assert merged.keys.tolist() == [0, 1, 4, 9, 10] and merged.counts.tolist() == [5, 1, 8, 3, 7]


def test_merging_runs_of_arena_rows_tells_equal_hashes_apart_by_words():
    arena = np.array([[1, 0], [3, 0], [2, 0], [3, 0], [7, 7]], np.uint64)
    a = Run(np.array([5, 5], np.uint64), np.array([0, 1]), np.array([1, 1]))
    b = Run(np.array([5, 5, 6], np.uint64), np.array([2, 3, 4]), np.array([10, 20, 30]))
    merged = merge_runs(a, b, arena)
    assert merged.keys.tolist() == [5, 5, 5, 6]
    assert arena[merged.refs, 0].tolist() == [1, 2, 3, 7] and merged.counts.tolist() == [1, 10, 21, 30]
