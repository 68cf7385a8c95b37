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
