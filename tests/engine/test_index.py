"""KeyIndex against a dict: every key found where its run holds it, the
others passed on in order, and a full buffer stopping the lookups."""

import numpy as np
import pytest

from tensorstate_onnx.engine.index import KeyIndex


@pytest.mark.parametrize("n_keys", [0, 1, 5, 1000, 4097])
def test_known_keys_are_counted_in_place_and_the_others_passed_on(n_keys):
    rng = np.random.default_rng(n_keys)
    # Keys equal in their low 40 bits, as keys of 3-byte states are: only the high bits tell them apart.
    keys = np.unique(rng.integers(0, 1 << 24, n_keys + 50, dtype=np.uint64))[:n_keys] << np.uint64(40)
    index = KeyIndex(keys)
    unknown = (np.arange(1 << 24, (1 << 24) + 300, dtype=np.uint64) << np.uint64(39))  # none of them a key
    looked = np.concatenate([keys[rng.integers(0, max(n_keys, 1), 3000)] if n_keys else keys, unknown])
    rng.shuffle(looked)
    counts = np.zeros(n_keys, np.int64)
    pending = np.zeros(len(looked), np.uint64)
    done, n_pending, found = index.count_keys(looked, 0, counts, pending, 0)
    position = {int(k): i for i, k in enumerate(keys)}
    expected = np.zeros(n_keys, np.int64)
    for key in looked:
        if int(key) in position:
            expected[position[int(key)]] += 1
    passed_on = [k for k in looked if int(k) not in position]
    assert done == len(looked) and found == expected.sum() and n_pending == len(passed_on) == 300
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(pending[:n_pending], passed_on)
    assert index.nbytes == 12 * len(index.slot_refs) and len(index.slot_refs) >= 2 * n_keys


def test_a_full_buffer_stops_the_lookups_at_the_key_that_did_not_fit():
    keys = np.arange(10, dtype=np.uint64) * np.uint64(3)
    index = KeyIndex(keys)
    looked = np.array([3, 1, 6, 2, 9, 4, 5], np.uint64)  # 1, 2, 4, 5 are not keys
    counts = np.zeros(10, np.int64)
    pending = np.zeros(2, np.uint64)
    done, n_pending, found = index.count_keys(looked, 0, counts, pending, 0)
    assert (done, n_pending, found) == (4, 2, 2)  # stopped after 2, which filled the buffer
    assert pending.tolist() == [1, 2] and counts[1] == counts[2] == 1
    pending = np.zeros(4, np.uint64)
    done, n_pending, found = index.count_keys(looked, done, counts, pending, 0)
    assert (done, n_pending, found) == (7, 2, 1) and pending[:2].tolist() == [4, 5] and counts[3] == 1


@pytest.mark.parametrize("n_words", [2, 5])
def test_rows_are_found_by_their_words_among_states_of_equal_hash(n_words):
    """Long states are keyed by hash: rows whose hash a held state shares but
    whose words differ are passed on, not counted (every key here is one of
    three hashes, so nearly every lookup meets states of its hash that differ)."""
    rng = np.random.default_rng(n_words)
    held = np.unique(rng.integers(0, 4, (200, n_words), dtype=np.uint64), axis=0)  # distinct states
    hash_of = lambda rows: (rows.sum(axis=1) % np.uint64(3)).astype(np.uint64)  # noqa: E731
    order = np.lexsort((*held.T[::-1], hash_of(held)))  # a run's order: hash, then words
    held = held[order]
    arena = np.zeros((len(held) + 500, n_words), np.uint64)
    arena[: len(held)] = held[::-1]  # the run refers to arena rows in another order
    refs = np.arange(len(held) - 1, -1, -1, dtype=np.int64)
    index = KeyIndex(hash_of(held))
    looked = np.concatenate([held[rng.integers(0, len(held), 300)], rng.integers(4, 8, (40, n_words), dtype=np.uint64)])
    rng.shuffle(looked)
    counts = np.zeros(len(held), np.int64)
    done, n_pending, found = index.count_rows(looked, hash_of(looked), refs, counts, arena, len(held), 0, 500)
    position = {row.tobytes(): i for i, row in enumerate(held)}
    expected = np.zeros(len(held), np.int64)
    for row in looked:
        if row.tobytes() in position:
            expected[position[row.tobytes()]] += 1
    passed_on = np.array([row for row in looked if row.tobytes() not in position])
    assert (done, n_pending, found) == (len(looked), 40, 300)
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_array_equal(arena[len(held) : len(held) + n_pending], passed_on)
    np.testing.assert_array_equal(arena[: len(held)], held[::-1])  # the held states untouched


def test_rows_stop_when_cap_rows_are_pending():
    held = np.arange(8, dtype=np.uint64).reshape(4, 2)
    index = KeyIndex(held[:, 0].copy())
    arena = np.zeros((7, 2), np.uint64)
    arena[:4] = held
    looked = np.array([[2, 3], [9, 9], [0, 1], [8, 8], [7, 7], [4, 5]], np.uint64)
    counts = np.zeros(4, np.int64)
    refs = np.arange(4, dtype=np.int64)
    done, n_pending, found = index.count_rows(looked, looked[:, 0].copy(), refs, counts, arena, 4, 1, 3)
    assert (done, n_pending, found) == (4, 3, 2)  # one was pending already; [8, 8] filled the buffer
    assert counts.tolist() == [1, 1, 0, 0] and arena[5:7].tolist() == [[9, 9], [8, 8]]
