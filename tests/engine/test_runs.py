"""Kernels over sorted runs: galloping search, counting into a run, absorbing, merging."""

import numpy as np
import pytest

from tensorstate_onnx.engine.runs import Run, absorb_kernel, count_sorted_keys, gallop, merge_many, merge_runs


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


def test_merging_short_runs_of_keys_equals_numpy_at_every_length():
    """Every pair of lengths up to 6 (a run's first and last keys take their own
    steps), keys from a small range so that many are equal, counts past 2**32."""
    rng = np.random.default_rng(3)
    for n1 in range(7):
        for n2 in range(7):
            for _ in range(20):
                runs = [np.unique(rng.integers(0, 9, n, dtype=np.uint64)) for n in (n1, n2)]
                counts = [rng.integers(1, 2**40, run.size) for run in runs]
                merged = merge_runs(*(Run(k, None, c) for k, c in zip(runs, counts)), None)
                keys, inverse = np.unique(np.concatenate(runs), return_inverse=True)
                want = np.zeros(keys.size, np.int64)
                np.add.at(want, inverse, np.concatenate(counts))
                assert merged.keys.tolist() == keys.tolist() and merged.counts.tolist() == want.tolist()


def test_merging_short_runs_of_arena_rows_equals_numpy_at_every_length():
    """Every pair of lengths up to 6, hashes from a tiny range (most equal
    hashes hold different states, some the same state in both runs)."""
    rng = np.random.default_rng(4)
    arena = rng.integers(0, 3, (40, 2)).astype(np.uint64)
    hashes = arena[:, 0] % np.uint64(2)  # equal for states that differ
    words = [tuple(row) for row in arena.tolist()]
    for n1 in range(7):
        for n2 in range(7):
            for _ in range(20):
                runs = []
                for n in (n1, n2):
                    rows = list({words[r]: r for r in rng.integers(0, 40, n)}.values())  # distinct states
                    rows.sort(key=lambda r: (int(hashes[r]), words[r]))
                    refs = np.array(rows, np.int64)
                    runs.append(Run(hashes[refs], refs, rng.integers(1, 2**40, refs.size)))
                merged = merge_runs(*runs, arena)
                want: dict = {}
                for run in runs:
                    for r, c in zip(run.refs.tolist(), run.counts.tolist()):
                        want[words[r]] = want.get(words[r], 0) + c
                got = [(int(h), words[r], c) for h, r, c in zip(merged.keys, merged.refs, merged.counts.tolist())]
                assert got == sorted((int(w[0]) % 2, w, c) for w, c in want.items())


def test_merging_runs_of_arena_rows_tells_equal_hashes_apart_by_words():
    arena = np.array([[1, 0], [3, 0], [2, 0], [3, 0], [7, 7]], np.uint64)
    a = Run(np.array([5, 5], np.uint64), np.array([0, 1]), np.array([1, 1]))
    b = Run(np.array([5, 5, 6], np.uint64), np.array([2, 3, 4]), np.array([10, 20, 30]))
    merged = merge_runs(a, b, arena)
    assert merged.keys.tolist() == [5, 5, 5, 6]
    assert arena[merged.refs, 0].tolist() == [1, 2, 3, 7] and merged.counts.tolist() == [1, 10, 21, 30]


@pytest.mark.parametrize("n_runs", [2, 3, 4, 5, 7, 9, 16])
@pytest.mark.parametrize("with_refs", [False, True])
def test_merging_many_runs_adds_the_counts_of_equal_states_and_leaves_the_runs_as_they_were(n_runs, with_refs):
    """Odd runs out at several levels (3, 5, 7, 9), given runs moving on as they are, empty runs."""
    rng = np.random.default_rng(n_runs * 2 + with_refs)
    # 200 distinct states of two words; the first word, of 4 values, stands for the hash
    arena = np.stack(np.divmod(rng.permutation(200), 50), axis=1).astype(np.uint64) if with_refs else None
    runs, expected = [], {}
    for r in range(n_runs):
        rows = np.unique(rng.integers(0, 200, rng.integers(0, 60) if r else 0))  # the first run empty
        counts = rng.integers(1, 9, rows.size)
        if with_refs:  # a hash of few values: equal hashes told apart by the rows' words
            keys = arena[rows, 0]
            order = np.lexsort((arena[rows, 1], keys))
            run = Run(keys[order], rows[order], counts[order])
            states = [tuple(arena[row]) for row in rows[order]]
        else:
            run = Run(rows.astype(np.uint64), None, counts)
            states = rows.tolist()
        for state, count in zip(states, run.counts.tolist(), strict=True):
            expected[state] = expected.get(state, 0) + count
        runs.append(run)
    before = [(run.keys.copy(), None if run.refs is None else run.refs.copy(), run.counts.copy()) for run in runs]
    merged = merge_many(runs, arena)
    states = [tuple(arena[r]) for r in merged.refs] if with_refs else merged.keys.tolist()
    assert dict(zip(states, merged.counts.tolist(), strict=True)) == expected
    assert len(states) == len(expected)  # each state once
    keys = merged.keys.tolist()
    assert keys == sorted(keys)
    for run, (keys, refs, counts) in zip(runs, before, strict=True):
        assert np.array_equal(run.keys, keys) and np.array_equal(run.counts, counts)
        assert refs is None or np.array_equal(run.refs, refs)
