"""StateCounter against numpy: counts, order, merges, pickles, memory, and how it
buffers, absorbs and merges runs."""

import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorstate_onnx.engine import CounterTuning, StateCounter, n_bytes_for
from tensorstate_onnx.engine.hashing import partition_of
from tensorstate_onnx.engine.keys import KeyRuns
from tensorstate_onnx.errors import OptionError, OptionTypeError, PackedStateError

SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def as_dict(ids, counts):
    assert ids.dtype == np.uint8 and counts.dtype == np.int64
    assert ids.shape[0] == counts.shape[0]
    table = {row.tobytes(): int(n) for row, n in zip(ids, counts)}
    assert len(table) == ids.shape[0], "a state was reported twice"
    return table


def unique_dict(packed):
    ids, counts = np.unique(packed, axis=0, return_counts=True)
    return as_dict(ids, counts)


def random_states(rng, n, c):
    """``n`` random packed states of ``c`` neurons (the unused high bits of the last byte 0)."""
    states = rng.integers(0, 256, (n, n_bytes_for(c)), dtype=np.uint8)
    if c % 8:
        states[:, -1] &= (1 << (c % 8)) - 1
    return states


def pooled_counter(rng, c, pool_size, n):
    """``(states, counter, expected)``: ``n`` states of ``c`` neurons drawn from a
    pool of ``pool_size`` (so they repeat), counted, and their counts by numpy."""
    pool = random_states(rng, pool_size, c)
    states = pool[rng.integers(0, len(pool), n)]
    counter = StateCounter(c)
    counter.add(states)
    return states, counter, unique_dict(states)


TINY = CounterTuning(chunk_rows=37, buffer_min_bytes=8, buffer_max_bytes=8 * 200)


@pytest.fixture(params=[None, TINY], ids=["default", "tiny"])
def tuning(request):
    """The default tuning, or tiny buffers and chunks so that small data goes
    through many buffers, chunks and merges."""
    return request.param


@st.composite
def packed_states(draw, channels=None):
    """Packed states of C neurons: few distinct, mostly distinct, or a mix."""
    c = draw(st.sampled_from([1, 5, 8, 9, 16, 17, 24, 32, 40, 64, 65, 100, 128, 200, 512, 1000]) if channels is None else st.just(channels))
    n = draw(st.integers(0, 600))
    kind = draw(st.sampled_from(["few", "distinct", "mixed", "sparse"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    width = n_bytes_for(c)
    states = rng.integers(0, 256, (n, width), dtype=np.uint8)
    if kind == "few":
        states = states[rng.integers(0, max(1, min(n, 7)), n)] if n else states
    elif kind == "mixed":
        pool = rng.integers(0, 256, (max(1, n // 3), width), dtype=np.uint8)
        take = rng.random(n) < 0.5
        states[take] = pool[rng.integers(0, pool.shape[0], int(take.sum()))]
    elif kind == "sparse":
        states &= (rng.random((n, width)) < 0.05).astype(np.uint8) * 255
    if c % 8:
        states[:, -1] &= (1 << (c % 8)) - 1
    return c, states


def split_points(draw, n):
    return sorted(draw(st.lists(st.integers(0, n), max_size=6)))


@SLOW
@given(packed_states(), st.data())
def test_counts_equal_np_unique(tuning, case, data):
    c, states = case
    counter = StateCounter(c, tuning)
    for part in np.split(states, split_points(data.draw, len(states))):
        counter.add(part)
    assert counter.total == len(states)
    ids, counts = counter.result()
    assert as_dict(ids, counts) == unique_dict(states)
    assert counter.n_distinct == ids.shape[0]
    # Sorted order is np.unique's order exactly.
    ids, counts = counter.result(sort=True)
    expected_ids, expected_counts = np.unique(states, axis=0, return_counts=True)
    np.testing.assert_array_equal(ids, expected_ids.reshape(-1, n_bytes_for(c)))
    np.testing.assert_array_equal(counts, expected_counts)
    # Asking again gives the same, and more adds keep counting.
    assert as_dict(*counter.result()) == unique_dict(states)
    counter.add(states)
    assert as_dict(*counter.result()) == {k: 2 * v for k, v in unique_dict(states).items()}


@SLOW
@given(packed_states(), st.data())
def test_streamed_batches_equal_one_batch(tuning, case, data):
    c, states = case
    whole = StateCounter(c, tuning)
    whole.add(states)
    streamed = StateCounter(c, tuning)
    for part in np.split(states, split_points(data.draw, len(states))):
        streamed.add(part)
    assert as_dict(*streamed.result()) == as_dict(*whole.result())
    assert streamed.total == whole.total
    a, b = streamed.result(sort=True), whole.result(sort=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@SLOW
@given(st.sampled_from([7, 20, 64, 100, 512]), st.data())
def test_merged_counters_equal_combined_data(tuning, c, data):
    parts = [data.draw(packed_states(c))[1] for _ in range(3)]
    counters = []
    for part in parts:
        counter = StateCounter(c, tuning)
        counter.add(part)
        counters.append(counter)
    merged = StateCounter(c, tuning)
    merged.add(parts[0][:3])
    merged.merge(counters[1])
    merged.merge(counters[2])
    merged.merge(counters[2])  # merging twice counts twice
    merged.add(parts[0][3:])
    combined = np.concatenate([parts[0], parts[1], parts[2], parts[2]])
    assert merged.total == len(combined)
    assert as_dict(*merged.result()) == unique_dict(combined)
    # The merged-in counters are unchanged and still usable.
    assert as_dict(*counters[2].result()) == unique_dict(parts[2])
    counters[2].add(parts[1])
    assert as_dict(*counters[2].result()) == unique_dict(np.concatenate([parts[2], parts[1]]))
    # A counter merged into itself doubles.
    before = unique_dict(combined)
    merged.merge(merged)
    assert as_dict(*merged.result()) == {k: 2 * v for k, v in before.items()}
    assert merged.total == 2 * len(combined)


@pytest.mark.parametrize("c", [17, 25, 32, 33])
@pytest.mark.parametrize("tuning", [None, TINY], ids=["default", "tiny"])
def test_states_of_up_to_four_bytes_sort_like_numpy(c, tuning):
    """States of 3 and 4 bytes are sorted as 32-bit words: the top bit of a
    4-byte state (its 32nd neuron) and states that differ only in the last
    byte keep numpy's order; 5 bytes sort as 64-bit words."""
    rng = np.random.default_rng(c)
    states = random_states(rng, 30_000, c)
    states[:500, -1] = 0xFF if c % 8 == 0 else (1 << (c % 8)) - 1  # top neuron on
    states[500:1000] = states[0]
    states[1000:1256, :-1] = 0  # the same but for the last byte
    states[1000:1256, -1] = np.arange(256) & (0xFF if c % 8 == 0 else (1 << (c % 8)) - 1)
    counter = StateCounter(c, tuning)
    for part in np.array_split(states, 7):
        counter.add(part)
    ids, counts = counter.result(sort=True)
    expected_ids, expected_counts = np.unique(states, axis=0, return_counts=True)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(counts, expected_counts)


@pytest.mark.parametrize("c", [5, 16, 40, 200])
def test_merge_checks_neurons_and_type(c):
    with pytest.raises(OptionError, match=f"{c + 1} neurons into counts of {c}"):
        StateCounter(c).merge(StateCounter(c + 1))
    with pytest.raises(OptionTypeError, match="takes a StateCounter"):
        StateCounter(c).merge({"counts": 1})


@SLOW
@given(packed_states(), st.data())
def test_pickle_round_trip_keeps_counting(tuning, case, data):
    c, states = case
    cut = data.draw(st.integers(0, len(states)))
    counter = StateCounter(c, tuning)
    counter.add(states[:cut])
    clone = pickle.loads(pickle.dumps(counter))
    assert clone.n_neurons == c and clone.n_bytes == n_bytes_for(c)
    assert clone.total == cut
    assert as_dict(*clone.result()) == unique_dict(states[:cut])
    clone.add(states[cut:])
    counter.add(states[cut:])
    assert as_dict(*clone.result()) == unique_dict(states) == as_dict(*counter.result())
    clone.merge(pickle.loads(pickle.dumps(counter)))
    assert as_dict(*clone.result()) == {k: 2 * v for k, v in unique_dict(states).items()}


def through_transit(counter, read_only):
    """``counter`` sent as a sharded run's workers send it: its transit form
    pickled with out-of-band buffers, which arrive read-only or writable."""
    buffers = []
    data = pickle.dumps(counter.to_transit(), protocol=5, buffer_callback=buffers.append)
    arrived = [bytes(b.raw()) if read_only else bytearray(b.raw()) for b in buffers]
    return StateCounter.from_transit(pickle.loads(data, buffers=arrived))


@SLOW
@given(packed_states(), st.data(), st.booleans())
def test_transit_round_trip_keeps_the_counts_and_counting(tuning, case, data, read_only):
    c, states = case
    cut = data.draw(st.integers(0, len(states)))
    counter = StateCounter(c, tuning)
    counter.add(states[:cut])
    clone = through_transit(counter, read_only)
    assert clone.n_neurons == c and clone.total == cut and clone.tuning == counter.tuning
    assert as_dict(*clone.result()) == unique_dict(states[:cut])
    assert np.array_equal(clone.counts(), counter.counts())  # the same order: nothing was re-sorted
    clone.add(states[cut:])  # counting goes on in arrays that may have arrived read-only
    assert as_dict(*clone.result()) == unique_dict(states)
    clone.merge_many([through_transit(counter, read_only), counter])
    assert as_dict(*clone.result()) == {k: v + 2 * w for k, v, w in _pairs(unique_dict(states), unique_dict(states[:cut]))}
    assert as_dict(*counter.result()) == unique_dict(states[:cut])  # the sender is unchanged


def _pairs(whole, part):
    return [(k, v, part.get(k, 0)) for k, v in whole.items()]


@pytest.mark.parametrize("c", [24, 200])
def test_transit_moves_the_arrays_as_held_not_packed_bytes(c):
    """What makes transit cheap: a long state goes as its arena words with its
    hash, never converted to packed bytes (which must be rehashed when loaded);
    counts go in the narrowest dtype."""
    states = random_states(np.random.default_rng(3), 5000, c)
    counter = StateCounter(c)
    counter.add(states)
    counter.merge(pickle.loads(pickle.dumps(counter)))  # two runs, arena rows in no run's order
    n_neurons, total, tuning, kind, held = counter.to_transit()
    assert (n_neurons, total, kind) == (c, 10_000, "runs")
    assert tuning is None  # the default tuning is not sent with every counter
    arrays = [a for a in held if a is not None]
    assert arrays[0].dtype == np.uint64 and arrays[0].shape == (counter.n_distinct,)  # keys or hashes
    assert all(a.dtype != np.uint8 or a.ndim == 1 for a in arrays)  # no packed rows
    assert any(a.dtype == np.uint8 and a.ndim == 1 for a in arrays)  # counts of 2 fit a byte
    if c > 64:
        hashes, refs, counts, words = held
        assert words.dtype == np.uint64 and words.shape == (counter.n_distinct, 4)
        assert refs is not None  # merged: arena rows in no run's order
        rows = np.ascontiguousarray(words[refs].view(np.uint8)[:, : n_bytes_for(c)])
        assert as_dict(rows, counts.astype(np.int64)) == as_dict(*counter.result())
        loaded = pickle.loads(pickle.dumps(counter))  # arena rows in run order: no refs to send
        assert loaded.to_transit()[4][1] is None
        assert as_dict(*through_transit(loaded, True).result()) == as_dict(*counter.result())


@pytest.mark.parametrize("c", [72, 200, 1000])
def test_pickled_states_out_of_order_or_repeated_are_counted_afresh(c):
    """A pickle lists long states in the order that lets loading skip the sort; a
    state whose rows are shuffled or repeated (not written by this class) must
    still load to the right counts."""
    rng = np.random.default_rng(c)
    states, counter, expected = pooled_counter(rng, c, 300, 5000)
    assert as_dict(*pickle.loads(pickle.dumps(counter)).result()) == expected
    state = counter.__getstate__()
    ids, counts = state["_runs"]
    order = rng.permutation(len(ids))
    for rows, weights in (
        (ids[order], counts[order]),  # shuffled
        (np.concatenate([ids, ids[:7]]), np.concatenate([counts, np.zeros(7, counts.dtype)])),  # repeated
    ):
        clone = StateCounter.__new__(StateCounter)
        older = {k: v for k, v in state.items() if k not in ("_repeating", "_next_check")}  # an older pickle
        clone.__setstate__({**older, "_runs": (rows, weights)})
        assert as_dict(*clone.result()) == expected
        clone.add(states[:100])
        assert as_dict(*clone.result()) == {k: v + unique_dict(states[:100]).get(k, 0) for k, v in expected.items()}


@pytest.mark.parametrize("c", [5, 16, 17, 40, 64, 65, 200])
def test_a_pickle_with_its_states_loads_as_the_counter_and_lists_what_it_counted(c):
    """``pickle_with_states`` converts the held states once for a pickle and
    for the states themselves: both must be what ``pickle.dumps`` and
    ``result()`` give apart, for every store (direct, keys, words)."""
    _, counter, expected = pooled_counter(np.random.default_rng(c), c, 400, 3000)
    blob, ids, counts = counter.pickle_with_states()
    assert ids.flags.c_contiguous and ids.shape[1] == n_bytes_for(c)
    assert as_dict(ids, counts) == expected
    back = pickle.loads(blob)
    assert isinstance(back, StateCounter) and back.total == counter.total == 3000
    assert as_dict(*back.result()) == expected
    assert len(blob) <= len(pickle.dumps(counter, protocol=5)) + 64  # the same state, not a larger form
    assert as_dict(*counter.result()) == expected  # the counter itself is left as it was
    empty_blob, empty_ids, empty_counts = StateCounter(c).pickle_with_states()
    assert empty_ids.shape == (0, n_bytes_for(c)) and empty_counts.size == 0
    assert pickle.loads(empty_blob).total == 0 and pickle.loads(empty_blob).n_distinct == 0


@pytest.mark.parametrize("c", [12, 64, 512])
def test_memory_and_pickle_follow_distinct_states(c):
    rng = np.random.default_rng(c)
    pool = random_states(rng, 10, c)
    counter = StateCounter(c)
    for _ in range(300):
        counter.add(pool[rng.integers(0, 10, 5000)])
    assert counter.total == 1_500_000
    assert counter.n_distinct == 10
    # Bounded by the distinct states plus a buffer of fixed size.
    assert counter.nbytes <= 2**16 * 8 + CounterTuning().buffer_min_bytes + 10_000
    assert len(pickle.dumps(counter)) < 2_000
    assert counter.result()[1].sum() == 1_500_000


def test_memory_of_many_distinct_states_stays_near_their_size():
    rng = np.random.default_rng(3)
    states = rng.integers(0, 256, (200_000, 64), dtype=np.uint8)
    counter = StateCounter(512)
    for _ in range(3):
        for part in np.array_split(states, 40):
            counter.add(part)
    # States, keys, counts and the buffer (which follows the distinct states).
    assert counter.nbytes <= 3.2 * states.nbytes
    assert counter.n_distinct == 200_000
    assert counter.nbytes <= 1.7 * states.nbytes  # merged into one run
    assert len(pickle.dumps(counter)) <= 1.15 * states.nbytes  # states and counts
    assert set(counter.result()[1].tolist()) == {3}


@pytest.mark.parametrize("c", [20, 32, 100])
def test_pickle_of_distinct_states_is_their_bytes_plus_one_byte_counts(c):
    rng = np.random.default_rng(c)
    states = np.unique(random_states(rng, 50_000, c), axis=0)
    counter = StateCounter(c)
    counter.add(states)
    counter.add(states[:10])
    clone = pickle.loads(pickle.dumps(counter))
    assert len(pickle.dumps(counter)) <= len(states) * (n_bytes_for(c) + 1) + 1_000
    ids, counts = clone.result(sort=True)
    np.testing.assert_array_equal(ids, states)
    assert counts.dtype == np.int64
    assert counts.tolist() == [2] * 10 + [1] * (len(states) - 10)
    clone.add(states[-1:])
    assert clone.result(sort=True)[1][-1] == 2 and clone.total == len(states) + 11


@pytest.mark.parametrize(
    "hash_mask",
    [
        0,  # every state has the same hash
        0b11 << 62,  # four hashes: many different states share each
        0b101,  # equal high bits (the part that is sorted first), different low bits
    ],
)
@SLOW
@given(st.sampled_from([65, 100, 512, 1000]), st.data())
def test_hash_collisions_never_merge_different_states(hash_mask, c, data):
    _, states = data.draw(packed_states(c))
    tuning = CounterTuning(hash_mask=hash_mask, chunk_rows=50, buffer_min_bytes=8)
    counter = StateCounter(c, tuning)
    for part in np.array_split(states, 4):
        counter.add(part)
    twin = StateCounter(c, tuning)  # merges runs of the same hash
    twin.add(states[: len(states) // 2])
    twin.merge(counter)
    other = pickle.loads(pickle.dumps(counter))  # loads with the default hash: merges count afresh
    other.merge(counter)
    assert as_dict(*counter.result()) == unique_dict(states)
    ids, counts = counter.result(sort=True)
    expected_ids, expected_counts = np.unique(states, axis=0, return_counts=True)
    np.testing.assert_array_equal(ids, expected_ids.reshape(-1, n_bytes_for(c)))
    np.testing.assert_array_equal(counts, expected_counts)
    assert as_dict(*other.result()) == {k: 2 * v for k, v in unique_dict(states).items()}
    assert as_dict(*twin.result()) == unique_dict(np.concatenate([states, states[: len(states) // 2]]))


def test_sorted_result_of_structured_states():
    # Long runs of equal leading words go through the column-by-column sort.
    rng = np.random.default_rng(4)
    states = np.zeros((20_000, 64), np.uint8)
    states[:, 40] = rng.integers(0, 256, 20_000)
    states[:, 41:] = rng.integers(0, 2, (20_000, 23))
    states[:5000, 8] = 1
    counter = StateCounter(512)
    counter.add(states)
    ids, counts = counter.result(sort=True)
    expected_ids, expected_counts = np.unique(states, axis=0, return_counts=True)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(counts, expected_counts)


@pytest.mark.parametrize("c", [3, 16, 30, 64, 300])
def test_empty_counter_and_small_state_order(c):
    counter = StateCounter(c)
    ids, counts = counter.result()
    assert ids.shape == (0, n_bytes_for(c)) and counts.shape == (0,)
    assert counter.n_distinct == 0 and counter.total == 0
    counter.add(np.zeros((0, n_bytes_for(c)), np.uint8))
    assert counter.total == 0
    clone = pickle.loads(pickle.dumps(counter))
    assert clone.result()[0].shape == (0, n_bytes_for(c))


@pytest.mark.parametrize("c", [3, 16, 30, 64, 300])
def test_counts_alone_follow_the_order_of_result(c):
    rng = np.random.default_rng(c)
    pool = random_states(rng, 400, c)
    counter = StateCounter(c)
    assert counter.counts().shape == (0,)
    # Runs that share a few states (merged-away rows stay in a long-state
    # arena: counts follow run order) ...
    for rows in (np.arange(300), np.arange(250, 300), np.arange(280, 300)):
        counter.add(pool[rows])
        assert np.array_equal(counter.counts(), counter.result()[1])
    # ... then many repeats, and a pickled counter merged in (arena order).
    counter.add(pool[rng.integers(0, 400, 3000)])
    other = StateCounter(c)
    other.add(random_states(rng, 500, c))
    counter.merge(pickle.loads(pickle.dumps(other)))
    counts = counter.counts()
    ids, expected = counter.result()
    assert np.array_equal(counts, expected)
    assert counts.sum() == counter.total == 3870
    assert as_dict(ids, counts) == as_dict(*counter.result(sort=True))


@pytest.mark.parametrize("c", [32, 48, 100, 300])
def test_repeated_states_add_to_the_largest_run_in_place(c):
    rng = np.random.default_rng(c)
    pool = random_states(rng, 20_000, c)
    counter = StateCounter(c)
    seen = []
    for rows in [np.arange(20_000)] + [rng.permutation(20_000) for _ in range(3)]:
        for start in range(0, 20_000, 3_000):  # batches, some buffered, of states all counted before
            batch = pool[rows[start : start + 3_000]]
            counter.add(batch)
            seen.append(batch)
    assert as_dict(*counter.result()) == unique_dict(np.concatenate(seen))
    assert set(counter.counts().tolist()) == {4}
    assert counter.n_runs == 1  # every later state was absorbed: no run beside the largest
    if counter.n_bytes > 8:
        assert counter.n_held == counter.n_distinct  # and its arena rows were given back


def test_absorbing_leaves_a_merged_counter_alone():
    rng = np.random.default_rng(7)
    for c in (32, 200):
        states = random_states(rng, 5_000, c)
        source = StateCounter(c)
        source.add(states)
        before = source.result()
        target = StateCounter(c)
        target.merge(source)
        for _ in range(3):
            target.add(states)
        assert as_dict(*target.result()) == {k: 4 * v for k, v in unique_dict(states).items()}
        after = source.result()
        assert np.array_equal(after[0], before[0]) and np.array_equal(after[1], before[1])


@pytest.mark.slow
def test_states_new_to_a_large_counter_are_counted_beside_it():
    rng = np.random.default_rng(8)
    for c in (64, 100):
        first = random_states(rng, 300_000, c)
        second = random_states(rng, 300_000, c)  # all new
        counter = StateCounter(c)
        counter.add(first)
        counter.add(second)
        counter.add(first[:1000])
        assert counter.n_distinct == 600_000
        assert as_dict(*counter.result()) == unique_dict(np.concatenate([first, second, first[:1000]]))


def test_forty_thousand_neurons_are_counted():
    rng = np.random.default_rng(40)
    packed = np.packbits(rng.random((6, 40_000)) > 0.5, axis=-1, bitorder="little")
    counter = StateCounter(40_000)
    counter.add(packed)
    counter.add(packed[:2])
    assert as_dict(*counter.result()) == unique_dict(np.concatenate([packed, packed[:2]]))


def test_result_arrays_are_copies():
    states = np.random.default_rng(5).integers(0, 256, (50, 64), dtype=np.uint8)
    counter = StateCounter(512)
    counter.add(states)
    ids, counts = counter.result()
    ids[:] = 0
    counts[:] = 0
    assert as_dict(*counter.result()) == unique_dict(states)


def test_counter_accepts_non_contiguous_packed_states():
    states = np.random.default_rng(6).integers(0, 256, (400, 20), dtype=np.uint8)
    for view in (states[::3, 2:11], states[::-1, 5:14], np.asfortranarray(states[:, :9])):
        counter = StateCounter(72)
        counter.add(view)
        assert as_dict(*counter.result()) == unique_dict(view)


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize("c", [9, 100])
def test_counter_add_rejects_bad_input(c):
    counter = StateCounter(c)
    width = n_bytes_for(c)
    with pytest.raises(OptionTypeError, match="uint8 numpy array"):
        counter.add(np.zeros((2, width), np.int8))
    with pytest.raises(OptionTypeError, match="uint8 numpy array"):
        counter.add(np.zeros((2, width), np.float32))
    with pytest.raises(PackedStateError, match=f"shape \\(n_states, {width}\\), got \\(2, {width + 1}\\)"):
        counter.add(np.zeros((2, width + 1), np.uint8))
    with pytest.raises(PackedStateError, match="shape"):
        counter.add(np.zeros(width, np.uint8))
    with pytest.raises(PackedStateError, match="shape"):
        counter.add(np.zeros((1, 2, width), np.uint8))
    unused = np.zeros((3, width), np.uint8)
    unused[2, -1] = 0x80
    with pytest.raises(PackedStateError, match="row 2 .* the unused high bits must be 0"):
        counter.add(unused)
    assert counter.total == 0 and counter.n_distinct == 0


@pytest.mark.parametrize("neurons", [0, -3, 2.0, True, "8", None])
def test_counter_needs_positive_int_neurons(neurons):
    with pytest.raises(OptionError, match="positive number of neurons"):
        StateCounter(neurons)


# ---------------------------------------------------------- buffers and absorbing


@pytest.mark.slow
@pytest.mark.parametrize("c, n", [(32, 3_200_000), (100, 1_600_000)])
def test_buffer_shrinks_while_states_repeat(c, n):
    """Once flushes find their states counted already, the buffer shrinks to
    1/_ABSORB_RATIO of the largest run: memory stays near the distinct states."""
    rng = np.random.default_rng(c)
    pool = random_states(rng, n, c)
    counter = StateCounter(c)
    for start in range(0, n, 100_000):
        counter.add(pool[start : start + 100_000])
    largest = counter._store.largest
    filled = []
    for _ in range(3):
        for start in range(0, n, 100_000):
            counter.add(pool[start : start + 100_000])
            filled.append(counter.n_pending)
    # The repeats were seen within a batch (the first one also flushed the new states of
    # the first pass), not once the buffer held as many states as the largest run.
    ratio = CounterTuning().absorb_ratio
    assert max(filled[1:]) < -(-largest // ratio) + 100_000
    assert counter.repeating
    assert counter.buffer_rows == -(-counter._store.largest // ratio)
    n_words = (n_bytes_for(c) + 7) // 8
    state_bytes = 8 * n_words + (8 if n_words == 1 else 24)  # key or words, refs, count
    assert counter.nbytes <= 1.3 * n * state_bytes  # 1.5x while the buffer followed the largest run
    ids, counts = counter.result(sort=True)
    expected_ids, expected_counts = np.unique(pool, axis=0, return_counts=True)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(counts, 4 * expected_counts)


@pytest.mark.parametrize("c", [32, 48, 100])
def test_a_first_buffer_of_new_states_grows_and_a_second_pass_stops_it(c):
    """New states stay in the first buffer, which doubles (no run, nothing
    merged); once grown it is checked every eighth against a sample of what it
    held, so a second pass over the same states is seen in its first batch,
    and the buffer is counted."""
    tuning = CounterTuning(buffer_min_bytes=8 * 1024 * ((n_bytes_for(c) + 7) // 8), buffer_max_bytes=1 << 22, sample_rows=256)
    rng = np.random.default_rng(c)
    pool = np.unique(random_states(rng, 5_000, c), axis=0)
    pool = pool[rng.permutation(len(pool))]
    counter, filled = StateCounter(c, tuning), []
    for _ in range(3):
        for part in np.array_split(pool, 10):
            counter.add(part)
            filled.append(counter.n_pending)
    assert filled[9] == len(pool) and counter.n_runs == 1  # the first pass sat in the buffer
    assert max(filled) == len(pool)  # grown from 1,024 rows to 8,192, no repeat kept
    assert as_dict(*counter.result()) == {row.tobytes(): 3 for row in pool}


@pytest.mark.parametrize("c", [40, 100])
def test_merging_absorbs_known_states_and_appends_new_ones(c):
    rng = np.random.default_rng(c)
    known = np.unique(random_states(rng, 100_000, c), axis=0)
    new = random_states(rng, 20_000, c)
    target, same, other = StateCounter(c), StateCounter(c), StateCounter(c)
    target.add(known)
    assert target.n_distinct == len(known)  # counted into a run
    same.add(known[::2])
    other.add(new)
    target.merge(same)  # a sample of it is known: absorbed into the run, no run added
    assert target.n_runs == 1 and target.repeating
    target.merge(other)  # mostly new: appended without absorbing
    assert not target.repeating and target.n_runs == 2
    if target.n_bytes <= 8:  # the run shares the other counter's keys, unread and uncopied
        assert np.shares_memory(target._store.runs[1].keys, other._store.runs[0].keys)
    expected = unique_dict(np.concatenate([known, known[::2], new]))
    assert as_dict(*target.result()) == expected
    assert as_dict(*same.result()) == unique_dict(known[::2])  # merged-from counters are untouched


@pytest.mark.parametrize("c", [24, 40, 72, 200])
@pytest.mark.parametrize("seed", range(3))
def test_mixed_streams_of_repeats_new_states_and_merges_equal_numpy(c, seed):
    """Small buffers and samples make every path run many times: buffers that
    fill with new states then repeats, absorbing into several runs, merges of
    known and new states, compaction in the middle of a stream."""
    tuning = CounterTuning(buffer_min_bytes=1 << 12, buffer_max_bytes=1 << 15, sample_rows=64)
    rng = np.random.default_rng(seed)
    pool = random_states(rng, 3_000, c)
    counter, seen = StateCounter(c, tuning), []
    for _ in range(60):
        kind = rng.integers(0, 5)
        size = int(rng.integers(1, 2_500))
        if kind <= 1:  # repeats from the pool
            batch = pool[rng.integers(0, len(pool), size)]
        elif kind == 2:  # new states
            batch = random_states(rng, size, c)
        elif kind == 3:  # a counter of part pool, part new states, merged
            batch = np.concatenate([pool[rng.integers(0, len(pool), size)],
                                    random_states(rng, size // 2, c)])  # fmt: skip
            other = StateCounter(c, tuning)
            other.add(batch)
            counter.merge(other)
            seen.append(batch)
            continue
        else:  # read the counts in the middle of the stream
            assert counter.n_distinct == len(unique_dict(np.concatenate(seen))) if seen else True
            continue
        counter.add(batch)
        seen.append(batch)
    everything = np.concatenate(seen)
    ids, counts = counter.result(sort=True)
    expected_ids, expected_counts = np.unique(everything, axis=0, return_counts=True)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(counts, expected_counts)
    assert counter.total == len(everything)



# ---------------------------------------------------------- the index of the largest run


def _indexed(counter: StateCounter) -> bool:
    return getattr(counter._store, "_index", None) is not None


def _pending_and_largest(counter: StateCounter) -> tuple[set, set]:
    """The states waiting in the buffer, and those of the largest run (as keys or words)."""
    store = counter._store
    if isinstance(store, KeyRuns):
        return set(store.pending[: store.n_pending].tolist()), set(store.runs[0].keys.tolist())
    pending = store.arena[store.arena_rows : store.arena_rows + store.n_pending]
    return {row.tobytes() for row in pending}, {row.tobytes() for row in store.arena[store.runs[0].refs]}


@pytest.mark.parametrize("c", [17, 24, 40, 64, 65, 100, 300])
def test_repeating_states_are_counted_through_an_index_of_the_largest_run(c):
    """Once states repeat, known ones are counted where they arrive and only
    new ones wait in the buffer; the counts equal numpy's and those of a
    counter that never indexes, through new states, merges and compactions."""
    rng = np.random.default_rng(c)
    pool = random_states(rng, 3_000, c)
    small = {"buffer_min_bytes": n_bytes_for(c) * 4096}
    indexed, plain = StateCounter(c, CounterTuning(**small)), StateCounter(c, CounterTuning(index_rows=0, **small))
    seen = []
    for step in range(40):
        batch = pool[rng.integers(0, len(pool), 20_000 if step == 20 else 2_000)]  # (20,000: looked up in chunks)
        if step % 7 == 3:  # some new states among the repeats
            batch = np.concatenate([batch, random_states(rng, 300, c)])
        for counter in (indexed, plain):
            counter.add(batch)
        seen.append(batch)
        if step == 10:
            assert indexed.repeating and _indexed(indexed) and not _indexed(plain)
            # The buffer holds only states the largest run lacks: the others were counted there.
            pending, largest = _pending_and_largest(indexed)
            assert not pending & largest and len(largest) >= 2_000
            assert indexed.n_pending < 2_000
        if step == 25:  # reading the counts midway compacts the runs; the index follows
            assert as_dict(*indexed.result()) == unique_dict(np.concatenate(seen))
    assert _indexed(indexed)
    ids, counts = indexed.result(sort=True)
    expected_ids, expected_counts = np.unique(np.concatenate(seen), axis=0, return_counts=True)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(counts, expected_counts)
    assert as_dict(*plain.result()) == as_dict(ids, counts)
    assert indexed.nbytes >= plain.nbytes + indexed._store._index[1].nbytes - 8 * indexed.buffer_rows


@pytest.mark.parametrize("hash_mask", [0x7, 0])
def test_the_index_of_long_states_tells_states_of_equal_hash_apart(hash_mask):
    """States over 8 bytes are indexed by hash; with the hash narrowed to 3
    bits (or none) every lookup meets states of its hash that differ, and
    only equal words count."""
    c = 130
    rng = np.random.default_rng(hash_mask)
    pool = random_states(rng, 300, c)
    counter = StateCounter(c, CounterTuning(hash_mask=hash_mask, buffer_min_bytes=24 * 1024))
    seen = []
    for step in range(12):
        batch = pool[rng.integers(0, len(pool), 1_500)]
        if step % 4 == 1:
            batch = np.concatenate([batch, random_states(rng, 50, c)])
        counter.add(batch)
        seen.append(batch)
    assert counter.repeating and _indexed(counter)
    assert as_dict(*counter.result()) == unique_dict(np.concatenate(seen))


@pytest.mark.parametrize("c", [24, 100])
def test_states_that_repeat_from_the_start_are_counted_early(c):
    """A first buffer whose latest states repeat among themselves is counted
    into a first run long before it is full (the index takes over from the
    next batch); one of distinct states keeps filling."""
    rng = np.random.default_rng(c)
    pool = random_states(rng, 500, c)
    repeating, distinct = StateCounter(c), StateCounter(c)
    batches = [pool[rng.integers(0, len(pool), 8_192)] for _ in range(3)]
    for batch in batches:
        repeating.add(batch)
        distinct.add(random_states(rng, 8_192, c))
    assert repeating.repeating and repeating.n_runs >= 1
    assert _indexed(repeating) and repeating.n_pending < 8_192  # only states the run lacks wait
    assert distinct.n_runs == 0 and distinct.n_pending == 3 * 8_192 and not distinct.repeating
    assert as_dict(*repeating.result()) == unique_dict(np.concatenate(batches))


def test_states_that_stop_repeating_stop_the_index():
    """When the states looked up in the index since the buffer was last
    counted were mostly not found, states no longer repeat: the index goes,
    and the buffer grows back to its size for new states."""
    c = 32
    rng = np.random.default_rng(5)
    pool = random_states(rng, 2_000, c)
    counter = StateCounter(c, CounterTuning(buffer_min_bytes=8 * 4096))
    for _ in range(6):
        counter.add(pool[rng.permutation(len(pool))])
    assert counter.repeating and _indexed(counter)
    new = random_states(rng, 20_000, c)
    counter.add(new)
    assert not counter.repeating and not _indexed(counter)
    expected = unique_dict(np.concatenate([pool] * 6 + [new]))
    assert as_dict(*counter.result()) == expected


def test_a_largest_run_beyond_index_rows_is_not_indexed():
    c = 40
    rng = np.random.default_rng(6)
    pool = random_states(rng, 3_000, c)
    counter = StateCounter(c, CounterTuning(index_rows=2_999, buffer_min_bytes=8 * 4096))
    for _ in range(5):
        counter.add(pool[rng.permutation(len(pool))])
    assert counter.repeating and not _indexed(counter)
    assert set(counter.counts().tolist()) == {5}


# --------------------------------------------------------------------------- partitions and histograms


@pytest.mark.parametrize("c", [5, 16, 24, 64, 65, 200])
@pytest.mark.parametrize("n_parts", [1, 2, 7])
def test_partition_splits_every_state_into_exactly_one_part(tuning, c, n_parts):
    rng = np.random.default_rng(c * 10 + n_parts)
    states = random_states(rng, 3000, c)
    states = np.concatenate([states, states[rng.integers(0, 3000, 2000)]])  # repeats
    counter = StateCounter(c, tuning)
    counter.add(states)
    before = as_dict(*counter.result())
    parts = counter.partition(n_parts)
    assert len(parts) == n_parts
    assert as_dict(*counter.result()) == before, "partition() changed the counter"
    seen: dict = {}
    for j, part in enumerate(parts):
        assert part.n_neurons == c and part.tuning is counter.tuning
        ids, _ = part.result()
        assert np.all(partition_of(ids, n_parts) == j), "a state is not in the part its hash names"
        table = as_dict(*part.result())
        assert part.total == sum(table.values())
        assert not seen.keys() & table.keys(), "a state went to two parts"
        seen.update(table)
    assert seen == unique_dict(states)
    assert sum(part.total for part in parts) == counter.total == len(states)


@pytest.mark.parametrize("c", [65, 200])
@pytest.mark.parametrize("n_parts", [1, 3, 8])
def test_long_states_split_alike_from_their_run_and_from_their_bytes(c, n_parts):
    """A counter of long states with the default hash splits straight from its
    run; one whose hashes are masked (so its run keys are not the canonical
    hash) goes through the packed bytes. Both put every state in the same part."""
    rng = np.random.default_rng(c + n_parts)
    pool = random_states(rng, 2000, c)
    states = pool[rng.integers(0, 2000, 5000)]
    by_run, by_bytes = StateCounter(c), StateCounter(c, CounterTuning(hash_mask=0x7, buffer_min_bytes=8))
    for counter in (by_run, by_bytes):
        for piece in np.array_split(states, 4):
            counter.add(piece)
    assert by_run._store.splits_by_key() and not by_bytes._store.splits_by_key()
    for part_run, part_bytes, j in zip(by_run.partition(n_parts), by_bytes.partition(n_parts), range(n_parts), strict=True):
        assert as_dict(*part_run.result()) == as_dict(*part_bytes.result())
        assert part_run.total == part_bytes.total and part_run.n_distinct == part_bytes.n_distinct
        assert np.all(partition_of(part_run.result()[0], n_parts) == j)
        part_run.add(pool[:3])  # a part counts on as any counter does
        assert part_run.total == part_bytes.total + 3


@pytest.mark.parametrize("c", [9, 40, 130])
def test_partition_puts_a_state_in_the_same_part_whatever_counter_holds_it(c):
    # Partition j of several counters (other processes, other data) merges on its
    # own: the part a state goes to depends on the state alone.
    rng = np.random.default_rng(c)
    pool = random_states(rng, 500, c)
    a, b = StateCounter(c), StateCounter(c)
    a.add(pool[rng.integers(0, 500, 800)])
    b.add(pool[rng.integers(0, 500, 800)])
    b = pickle.loads(pickle.dumps(b))
    whole = StateCounter(c)
    whole.merge(a)
    whole.merge(b)
    merged_parts = []
    for part_a, part_b in zip(a.partition(4), b.partition(4)):
        part_a.merge(part_b)
        merged_parts.append(as_dict(*part_a.result()))
    for j, table in enumerate(merged_parts):
        for other in merged_parts[j + 1 :]:
            assert not table.keys() & other.keys()
    assert {k: v for t in merged_parts for k, v in t.items()} == as_dict(*whole.result())


def test_partition_of_an_empty_counter_and_bad_part_counts():
    parts = StateCounter(30).partition(3)
    assert [p.total for p in parts] == [0, 0, 0] and all(p.n_distinct == 0 for p in parts)
    for bad in (0, -1, 1.5, True, None, 2**31 + 1):
        with pytest.raises(OptionError, match="number of parts from 1 to 2,147,483,648"):
            StateCounter(30).partition(bad)


@pytest.mark.parametrize("c", [3, 16, 40, 100])
def test_count_histogram_against_numpy(c):
    rng = np.random.default_rng(c)
    pool = random_states(rng, 200, c)
    states = pool[rng.zipf(1.5, 5000) % 200]
    counter = StateCounter(c)
    counter.add(states)
    values, multiplicities = counter.count_histogram()
    _, counts = np.unique(states, axis=0, return_counts=True)
    want_values, want_mult = np.unique(counts, return_counts=True)
    assert values.dtype == multiplicities.dtype == np.int64
    assert np.array_equal(values, want_values) and np.array_equal(multiplicities, want_mult)
    assert int((values * multiplicities).sum()) == counter.total
    # The histograms of the parts add up to the whole one.
    summed: dict = {}
    for part in counter.partition(5):
        for v, m in zip(*part.count_histogram()):
            summed[int(v)] = summed.get(int(v), 0) + int(m)
    assert summed == dict(zip(want_values.tolist(), want_mult.tolist()))
    empty = StateCounter(c).count_histogram()
    assert empty[0].size == empty[1].size == 0


@pytest.mark.parametrize("c", [8, 30, 100])
def test_count_histogram_follows_every_change_of_the_counts(c):
    """The histogram is kept between calls (each alpha's entropy reads it) and
    must be computed again after add, merge and unpickling."""
    rng = np.random.default_rng(c)
    states = random_states(rng, 300, c)
    counter = StateCounter(c)

    def expected(rows):
        counts = np.unique(rows, axis=0, return_counts=True)[1]
        return [a.tolist() for a in np.unique(counts, return_counts=True)]

    counter.add(states[:100])
    first = counter.count_histogram()
    first[1][:] = 0  # the caller's copy; the kept one is not changed
    assert [a.tolist() for a in counter.count_histogram()] == expected(states[:100])
    counter.add(states[:50])
    assert [a.tolist() for a in counter.count_histogram()] == expected(np.concatenate([states[:100], states[:50]]))
    other = StateCounter(c)
    other.add(states[200:])
    counter.merge(other)
    everything = np.concatenate([states[:100], states[:50], states[200:]])
    assert [a.tolist() for a in counter.count_histogram()] == expected(everything)
    assert [a.tolist() for a in pickle.loads(pickle.dumps(counter)).count_histogram()] == expected(everything)


@pytest.mark.parametrize("c", [7, 16, 20, 64, 100, 512])
@pytest.mark.parametrize("n_others", [0, 1, 2, 5, 12])
@pytest.mark.parametrize("tuning", [None, TINY, CounterTuning(hash_mask=0, chunk_rows=50, buffer_min_bytes=8)])
def test_merge_many_equals_numpy_on_everything_merged(c, n_others, tuning):
    """States shared between counters (drawn from one pool), counters with pending
    states and several runs (TINY), every state with the same hash (hash_mask=0)."""
    rng = np.random.default_rng(c * 100 + n_others)
    pool = random_states(rng, 400, c)
    parts = [pool[rng.integers(0, 400, rng.integers(0, 300))] for _ in range(n_others + 1)]
    counters = []
    for part in parts:
        counter = StateCounter(c, tuning)
        for piece in np.array_split(part, 3):
            counter.add(piece)
        counters.append(counter)
    before = [as_dict(*counter.result()) for counter in counters[1:]]
    merged = counters[0]
    merged.merge_many(counters[1:])
    combined = np.concatenate(parts)
    assert merged.total == len(combined)
    assert as_dict(*merged.result()) == (unique_dict(combined) if len(combined) else {})
    assert merged.n_distinct == len(unique_dict(combined)) if len(combined) else merged.n_distinct == 0
    # The merged-in counters are unchanged and still count; the merged one too.
    assert [as_dict(*counter.result()) for counter in counters[1:]] == before
    if n_others:
        counters[1].add(pool[:5])
        assert as_dict(*counters[1].result()) == unique_dict(np.concatenate([parts[1], pool[:5]]))
    merged.add(pool[:7])
    assert as_dict(*merged.result()) == unique_dict(np.concatenate([combined, pool[:7]]))


@pytest.mark.parametrize("c", [100, 512])
def test_merge_many_counts_afresh_the_counters_of_another_hash(c):
    rng = np.random.default_rng(c)
    pool = random_states(rng, 200, c)
    parts = [pool[rng.integers(0, 200, 150)] for _ in range(4)]
    counters = [StateCounter(c, None if i % 2 else CounterTuning(hash_mask=0b101)) for i in range(4)]
    for counter, part in zip(counters, parts, strict=True):
        counter.add(part)
    counters[0].merge_many(counters[1:])
    assert as_dict(*counters[0].result()) == unique_dict(np.concatenate(parts))


@pytest.mark.parametrize("c", [8, 16, 40, 200])
def test_merge_many_with_the_counter_itself_among_others_adds_its_counts_as_they_were(c):
    rng = np.random.default_rng(c)
    pool = random_states(rng, 6, c)
    a_rows, b_rows = pool[rng.integers(0, 6, 40)], pool[rng.integers(0, 6, 30)]
    a, b = StateCounter(c), StateCounter(c)
    a.add(a_rows)
    b.add(b_rows)
    a.merge_many([b, a])
    assert as_dict(*a.result()) == unique_dict(np.concatenate([a_rows, b_rows, a_rows]))
    assert a.total == a.counts().sum() == 110


def test_merge_many_checks_neurons_and_types():
    with pytest.raises(OptionError, match="31 neurons into counts of 30"):
        StateCounter(30).merge_many([StateCounter(30), StateCounter(31)])
    with pytest.raises(OptionTypeError, match="takes StateCounters"):
        StateCounter(30).merge_many([StateCounter(30), {"counts": 1}])
