"""Property tests of the state engine: pack, unpack and StateCounter against numpy."""

import pickle

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorstate_onnx.engine as engine
from tensorstate_onnx.engine import StateCounter, n_bytes_for, pack, unpack

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def reference_pack(x, axis):
    c = x.shape[axis]
    return np.packbits(np.moveaxis(x, axis, -1).reshape(-1, c) > 0, axis=-1, bitorder="little")


def as_dict(ids, counts):
    assert ids.dtype == np.uint8 and counts.dtype == np.int64
    assert ids.shape[0] == counts.shape[0]
    table = {row.tobytes(): int(n) for row, n in zip(ids, counts)}
    assert len(table) == ids.shape[0], "a state was reported twice"
    return table


def unique_dict(packed):
    ids, counts = np.unique(packed, axis=0, return_counts=True)
    return as_dict(ids, counts)


# ----------------------------------------------------------------------- values

F16_SUBNORMAL = np.float16(2.0**-24)
SPECIALS = [
    np.nan, -np.nan, np.copysign(np.nan, -1.0), 0.0, -0.0, np.inf, -np.inf, 1.0, -1.0,
    1e-45, -1e-45, 5e-324, -5e-324, float(F16_SUBNORMAL), -float(F16_SUBNORMAL), 65504.0, 1e300,
]


def random_values(rng, shape, dtype):
    """Normals mixed with special values and, for floats, arbitrary bit patterns
    (every NaN payload and sign, subnormals)."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        # Any non-zero byte is True; include bytes other than 0 and 1.
        return rng.choice(np.array([0, 1, 2, 128, 255], np.uint8), shape).view(np.bool_)
    with np.errstate(over="ignore", invalid="ignore"):
        values = rng.standard_normal(shape).astype(dtype)
        special = np.array(SPECIALS).astype(dtype)
    pick = rng.random(shape)
    values = np.where(pick < 0.3, rng.choice(special, shape), values).astype(dtype)
    bits = rng.integers(0, 2 ** (8 * dtype.itemsize), shape, dtype=np.uint64, endpoint=False)
    raw = bits.astype(f"u{dtype.itemsize}").view(dtype)
    return np.where(pick > 0.85, raw, values).astype(dtype)


@st.composite
def strided_arrays(draw, max_channels=20, max_side=5):
    """An array of rank 1-5 of any supported dtype, as a view with unusual
    strides (steps, negative steps, transposes, stride-0 broadcasts), and a
    channel axis."""
    rank = draw(st.integers(1, 5))
    shape = [draw(st.integers(1, max_side)) for _ in range(rank)]
    axis = draw(st.integers(-rank, rank - 1))
    shape[axis] = draw(st.integers(1, max_channels))
    dtype = draw(st.sampled_from([np.float16, np.float32, np.float64, np.bool_]))
    steps = [draw(st.sampled_from([1, 1, 2, -1, -3])) for _ in range(rank)]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = random_values(rng, [n * abs(s) + 1 for n, s in zip(shape, steps)], dtype)
    index = tuple(slice(None, None, s) if s > 0 else slice(None, None, s) for s in steps)
    x = base[index][tuple(slice(0, n) for n in shape)]
    if draw(st.booleans()):
        # Broadcast one axis: stride 0.
        b = draw(st.integers(0, rank - 1))
        x = np.broadcast_to(x[tuple(slice(0, 1) if i == b else slice(None) for i in range(rank))], x.shape)
    if draw(st.booleans()):
        perm = draw(st.permutations(range(rank)))
        x = x.transpose(perm)
        axis = perm.index(axis % rank)
    axis %= rank
    return x, axis if draw(st.booleans()) else axis - rank


# ------------------------------------------------------------------------- pack


@FAST
@given(strided_arrays())
def test_pack_equals_packbits_of_positive_values(case):
    x, axis = case
    got = pack(x, axis)
    expected = reference_pack(x, axis)
    assert got.dtype == np.uint8
    assert got.shape == (x.size // x.shape[axis], n_bytes_for(x.shape[axis]))
    np.testing.assert_array_equal(got, expected)


def test_pack_special_values_one_by_one():
    for dtype in (np.float16, np.float32, np.float64):
        with np.errstate(over="ignore"):
            values = np.array(SPECIALS, dtype=dtype)
        fires = pack(values[:, None], 1)[:, 0]
        expected = [1 if v > 0 else 0 for v in values.tolist()]
        assert fires.tolist() == expected, dtype
    # The smallest subnormals fire; every zero, NaN and negative does not.
    assert pack(np.array([1e-45], np.float32)).tolist() == [[1]]
    assert pack(np.array([F16_SUBNORMAL], np.float16)).tolist() == [[1]]
    assert pack(np.array([-0.0, np.nan, -np.nan, -np.inf, np.inf])).tolist() == [[16]]
    # float16: every bit pattern.
    every = np.arange(2**16, dtype=np.uint16).view(np.float16)
    np.testing.assert_array_equal(pack(every[:, None]), reference_pack(every[:, None], 1))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.bool_])
@pytest.mark.parametrize("offset", range(9))
def test_channels_last_kernel_at_every_output_alignment(offset, dtype):
    """Contiguous channels-last blocks are packed 64 values to an aligned word,
    with single bytes before and after; output rows start at any address when
    a large input is split between threads."""
    rng = np.random.default_rng(offset)
    x = random_values(rng, (3, 37, 24), dtype)
    values, lo, hi = engine._comparable(x)
    buffer = np.zeros(3 * 37 * 3 + 16, np.uint8)
    out = buffer[offset : offset + 3 * 37 * 3].reshape(-1, 3)
    engine._run_block(values, lo, hi, out)
    np.testing.assert_array_equal(out, reference_pack(x, -1))
    assert not buffer[:offset].any() and not buffer[offset + out.size :].any()


@pytest.mark.parametrize("channels", [8, 12])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_pack_large_inputs_use_threads_and_stay_exact(channels, layout):
    rng = np.random.default_rng(channels)
    shape = (130, channels, 33, 31) if layout == "first" else (130, 33, 31, channels)
    x = random_values(rng, shape, np.float32)
    assert x.nbytes > engine._PARALLEL_MIN_BYTES
    axis = 1 if layout == "first" else -1
    np.testing.assert_array_equal(pack(x, axis), reference_pack(x, axis))
    # The same through a non-contiguous view.
    view = x[::-1, :, ::2]
    np.testing.assert_array_equal(pack(view, axis), reference_pack(view, axis))
    with np.errstate(over="ignore"):
        half = x.astype(np.float16)
    np.testing.assert_array_equal(pack(half, axis), reference_pack(half, axis))


@pytest.mark.parametrize("channels", [1, 5, 9, 63, 64, 65, 130, 512, 1000])
def test_pack_channels_first_block_edges(channels):
    # Block transposes 8 states x 8 bytes at a time; remainders of either go byte by byte.
    rng = np.random.default_rng(channels)
    for positions in (1, 7, 8, 13, 300):
        x = random_values(rng, (3, channels, positions), np.float32)
        np.testing.assert_array_equal(pack(x, 1), reference_pack(x, 1))
        strided = random_values(rng, (3, channels, 2 * positions), np.float16)[:, :, ::2]
        np.testing.assert_array_equal(pack(strided, 1), reference_pack(strided, 1))
        stacked = random_values(rng, (2, positions, 3, channels), np.float64).transpose(0, 3, 1, 2)
        np.testing.assert_array_equal(pack(stacked, 1), reference_pack(stacked, 1))


@pytest.mark.parametrize("channels", [65_536, 70_000])
def test_pack_single_huge_state(channels):
    rng = np.random.default_rng(channels)
    x = random_values(rng, (channels,), np.float32)
    got = pack(x)
    assert got.shape == (1, n_bytes_for(channels))
    np.testing.assert_array_equal(got, reference_pack(x, 0))
    np.testing.assert_array_equal(unpack(got, channels)[0], x > 0)
    first = x.reshape(1, channels, 1, 1)
    np.testing.assert_array_equal(pack(first, 1), got)


def test_forty_thousand_neurons_do_not_crash():
    # TensorState 0.4 overflowed the stack at >= 32,768 neurons.
    rng = np.random.default_rng(40)
    x = random_values(rng, (3, 40_000, 2), np.float32)
    packed = pack(x, 1)
    np.testing.assert_array_equal(packed, reference_pack(x, 1))
    counter = StateCounter(40_000)
    counter.add(packed)
    counter.add(packed[:2])
    assert as_dict(*counter.result()) == unique_dict(np.concatenate([packed, packed[:2]]))
    np.testing.assert_array_equal(unpack(packed, 40_000), np.moveaxis(x, 1, -1).reshape(-1, 40_000) > 0)


def test_pack_of_empty_batch_and_zero_strides():
    assert pack(np.zeros((0, 5), np.float32)).shape == (0, 1)
    x = np.broadcast_to(np.float32(2.0), (3, 4, 9))
    np.testing.assert_array_equal(pack(x, 1), reference_pack(x, 1))


# ----------------------------------------------------------------------- unpack


@FAST
@given(st.integers(1, 2**15), st.integers(0, 6), st.integers(0, 2**32 - 1))
def test_unpack_inverts_pack(channels, n, seed):
    x = np.random.default_rng(seed).standard_normal((n, channels)).astype(np.float32)
    packed = pack(x)
    bits = unpack(packed, channels)
    assert bits.dtype == np.bool_ and bits.shape == (n, channels)
    np.testing.assert_array_equal(bits, x > 0)
    np.testing.assert_array_equal(pack(bits), packed)


# --------------------------------------------------------------------- counting


@pytest.fixture(params=["default", "tiny"])
def sizes(request, monkeypatch):
    """Default buffer and chunk sizes, or tiny ones so that small data goes
    through many buffers, chunks and merges."""
    if request.param == "tiny":
        monkeypatch.setattr(engine, "_CHUNK_ROWS", 37)
        monkeypatch.setattr(engine, "_BUFFER_MIN_BYTES", 8)
        monkeypatch.setattr(engine, "_BUFFER_MAX_BYTES", 8 * 200)
    return request.param


@st.composite
def packed_states(draw, channels=None):
    """Packed states of C neurons: few distinct, mostly distinct, or a mix."""
    c = draw(st.sampled_from([1, 5, 8, 9, 16, 17, 24, 40, 64, 65, 100, 128, 200, 512, 1000]) if channels is None else st.just(channels))
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
def test_counts_equal_np_unique(sizes, case, data):
    c, states = case
    counter = StateCounter(c)
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
@given(
    n=st.integers(engine._RADIX_MIN - 3, 3 * engine._RADIX_MIN),
    zero_low_bytes=st.integers(0, 7),
    few_values=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_radix_sort_of_keys_equals_np_sort(n, zero_low_bytes, few_values, seed):
    """Keys like those of 3..8-byte states (low bytes zero), with many or few
    distinct values; the kernel runs above _RADIX_MIN keys."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    if few_values:
        keys = rng.choice(keys[:5], n)
    keys = (keys >> np.uint64(8 * zero_low_bytes)) << np.uint64(8 * zero_low_bytes)
    expected = np.sort(keys)
    engine._sort_keys(keys)
    np.testing.assert_array_equal(keys, expected)


@pytest.mark.parametrize("n", [engine._RADIX_MIN, 100_000, 1 << 20])
def test_radix_sort_of_tags_skips_their_ordered_index_bits(n):
    """Tags (hash high bits | row index) sort like np.sort though only the hash
    bits are sorted: the index bits are in order within equal hash bits."""
    rng = np.random.default_rng(n)
    hashes = rng.integers(0, 2**64, n, dtype=np.uint64, endpoint=False)
    hashes[rng.integers(0, n, n // 4)] = hashes[0]  # many equal hashes
    bits = int(n - 1).bit_length()
    tags = np.empty(n, np.uint64)
    engine._tag(hashes, bits, tags)
    expected = np.sort(tags)
    engine._sort_keys(tags, bits)
    np.testing.assert_array_equal(tags, expected)


@SLOW
@given(packed_states(), st.data())
def test_streamed_batches_equal_one_batch(sizes, case, data):
    c, states = case
    whole = StateCounter(c)
    whole.add(states)
    streamed = StateCounter(c)
    for part in np.split(states, split_points(data.draw, len(states))):
        streamed.add(part)
    assert as_dict(*streamed.result()) == as_dict(*whole.result())
    assert streamed.total == whole.total
    a, b = streamed.result(sort=True), whole.result(sort=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@SLOW
@given(st.sampled_from([7, 20, 64, 100, 512]), st.data())
def test_merged_counters_equal_combined_data(sizes, c, data):
    parts = [data.draw(packed_states(c))[1] for _ in range(3)]
    counters = []
    for part in parts:
        counter = StateCounter(c)
        counter.add(part)
        counters.append(counter)
    merged = StateCounter(c)
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


@pytest.mark.parametrize("c", [5, 16, 40, 200])
def test_merge_checks_neurons_and_type(c):
    with pytest.raises(ValueError, match=f"{c + 1} neurons into counts of {c}"):
        StateCounter(c).merge(StateCounter(c + 1))
    with pytest.raises(TypeError, match="takes a StateCounter"):
        StateCounter(c).merge({"counts": 1})


@SLOW
@given(packed_states(), st.data())
def test_pickle_round_trip_keeps_counting(sizes, case, data):
    c, states = case
    cut = data.draw(st.integers(0, len(states)))
    counter = StateCounter(c)
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


@pytest.mark.parametrize("c", [72, 200, 1000])
def test_pickled_states_out_of_order_or_repeated_are_counted_afresh(c):
    """A pickle lists long states in the order that lets loading skip the sort; a
    state whose rows are shuffled or repeated (not written by this class) must
    still load to the right counts."""
    rng = np.random.default_rng(c)
    pool = rng.integers(0, 256, (300, n_bytes_for(c)), dtype=np.uint8)
    pool[:, -1] &= (1 << (c - 8 * (n_bytes_for(c) - 1))) - 1
    states = pool[rng.integers(0, len(pool), 5000)]
    counter = StateCounter(c)
    counter.add(states)
    expected = unique_dict(states)
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


@pytest.mark.parametrize("c", [12, 64, 512])
def test_memory_and_pickle_follow_distinct_states(c):
    rng = np.random.default_rng(c)
    pool = rng.integers(0, 256, (10, n_bytes_for(c)), dtype=np.uint8)
    counter = StateCounter(c)
    for _ in range(300):
        counter.add(pool[rng.integers(0, 10, 5000)])
    assert counter.total == 1_500_000
    assert counter.n_distinct == 10
    # Bounded by the distinct states plus a buffer of fixed size.
    assert counter.nbytes <= 2**16 * 8 + engine._BUFFER_MIN_BYTES + 10_000
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
    states = np.unique(rng.integers(0, 256, (50_000, n_bytes_for(c)), dtype=np.uint8), axis=0)
    states[:, -1] &= (1 << (c - 8 * (n_bytes_for(c) - 1))) - 1  # unused high bits stay 0
    states = np.unique(states, axis=0)
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


def constant_hash(words):
    return np.zeros(words.shape[0], np.uint64)


def weak_hash(words):
    # Only two bits survive: many different states share every hash.
    return (words[:, 0] & np.uint64(3)) << np.uint64(62)


def low_bits_hash(words):
    # Equal high bits (the part that is sorted first), different low bits.
    return (words[:, -1] & np.uint64(5)) | np.uint64(1 << 40)


@pytest.mark.parametrize("hash_function", [constant_hash, weak_hash, low_bits_hash])
@SLOW
@given(st.sampled_from([65, 100, 512, 1000]), st.data())
def test_hash_collisions_never_merge_different_states(hash_function, c, data):
    _, states = data.draw(packed_states(c))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "_hash_rows", hash_function)
        patch.setattr(engine, "_CHUNK_ROWS", 50)
        patch.setattr(engine, "_BUFFER_MIN_BYTES", 8)
        counter = StateCounter(c)
        for part in np.array_split(states, 4):
            counter.add(part)
        other = pickle.loads(pickle.dumps(counter))
        other.merge(counter)
        assert as_dict(*counter.result()) == unique_dict(states)
        ids, counts = counter.result(sort=True)
        expected_ids, expected_counts = np.unique(states, axis=0, return_counts=True)
        np.testing.assert_array_equal(ids, expected_ids.reshape(-1, n_bytes_for(c)))
        np.testing.assert_array_equal(counts, expected_counts)
        assert as_dict(*other.result()) == {k: 2 * v for k, v in unique_dict(states).items()}


def test_large_group_of_colliding_states(monkeypatch):
    # More distinct states in one hash group than the linear scan handles.
    monkeypatch.setattr(engine, "_hash_rows", constant_hash)
    rng = np.random.default_rng(9)
    pool = rng.integers(0, 256, (300, 13), dtype=np.uint8)
    states = pool[rng.integers(0, 300, 5000)]
    counter = StateCounter(100)
    states[:, -1] &= 15
    counter.add(states)
    assert as_dict(*counter.result()) == unique_dict(states)


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
    width = n_bytes_for(c)
    pool = rng.integers(0, 256, (400, width), dtype=np.uint8)
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
    other.add(rng.integers(0, 256, (500, width), dtype=np.uint8))
    counter.merge(pickle.loads(pickle.dumps(other)))
    counts = counter.counts()
    ids, expected = counter.result()
    assert np.array_equal(counts, expected)
    assert counts.sum() == counter.total == 3870
    assert as_dict(ids, counts) == as_dict(*counter.result(sort=True))


@pytest.mark.parametrize("c", [32, 48, 100, 300])
def test_repeated_states_add_to_the_largest_run_in_place(c):
    rng = np.random.default_rng(c)
    width = n_bytes_for(c)
    pool = rng.integers(0, 256, (20_000, width), dtype=np.uint8)
    counter = StateCounter(c)
    seen = []
    for rows in [np.arange(20_000)] + [rng.permutation(20_000) for _ in range(3)]:
        for start in range(0, 20_000, 3_000):  # batches, some buffered, of states all counted before
            batch = pool[rows[start : start + 3_000]]
            counter.add(batch)
            seen.append(batch)
    assert as_dict(*counter.result()) == unique_dict(np.concatenate(seen))
    assert set(counter.counts().tolist()) == {4}
    assert len(counter._runs) == 1  # every later state was absorbed: no run beside the largest
    if counter._n_words > 1:
        assert counter._arena_rows == counter.n_distinct  # and its arena rows were given back


def test_absorbing_leaves_a_merged_counter_alone():
    rng = np.random.default_rng(7)
    for c in (32, 200):
        states = rng.integers(0, 256, (5_000, n_bytes_for(c)), dtype=np.uint8)
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


def test_absorb_compares_the_words_of_states_with_equal_hashes():
    from tensorstate_onnx.engine import _absorb_kernel

    arena = np.array([[1, 0], [2, 0], [3, 0], [9, 9], [2, 0], [4, 0], [3, 0]], np.uint64)
    h1, r1, c1 = np.array([5, 5, 5, 8], np.uint64), np.array([0, 1, 2, 3]), np.array([1, 1, 1, 1])
    # Run 2 shares hash 5 with run 1: (2, 0) and (3, 0) are held, (4, 0) is not.
    h2, r2, c2 = np.array([5, 5, 5, 6], np.uint64), np.array([4, 6, 5, 5]), np.array([10, 20, 30, 40])
    order = np.lexsort((arena[r2, 0], h2))
    h2, r2, c2 = h2[order], r2[order], c2[order]
    out_h, out_r, out_c = np.empty(4, np.uint64), np.empty(4, np.int64), np.empty(4, np.int64)
    m = _absorb_kernel(h1, r1, c1, h2, r2, c2, arena, out_h, out_r, out_c)
    assert c1.tolist() == [1, 11, 21, 1]
    assert m == 2
    assert out_h[:m].tolist() == [5, 6] and out_r[:m].tolist() == [5, 5] and out_c[:m].tolist() == [30, 40]


@pytest.mark.parametrize("n", [0, 1, 5, 1000])
def test_gallop_finds_what_searchsorted_finds(n):
    from tensorstate_onnx.engine import _gallop

    rng = np.random.default_rng(n)
    h = np.sort(rng.integers(0, 50, n).astype(np.uint64))
    for start in {0, n // 3, n}:
        for v in range(-1, 52, 3):
            v = np.uint64(max(v, 0))
            expected = start + int(np.searchsorted(h[start:], v, side="left"))
            assert _gallop(h, start, v) == expected


def test_counting_sorted_keys_into_a_run_adds_known_states_in_place():
    from tensorstate_onnx.engine import _count_sorted_keys

    h1, c1 = np.array([3, 7, 9, 20], np.uint64), np.array([1, 1, 1, 1])
    keys = np.array([1, 3, 3, 8, 9, 9, 9, 25], np.uint64)
    out = np.empty(keys.size, np.int64)
    m, distinct = _count_sorted_keys(keys, np.empty(0, np.int64), h1, c1, keys, out)
    assert c1.tolist() == [3, 1, 4, 1]
    assert distinct == 5
    assert m == 3 and keys[:m].tolist() == [1, 8, 25] and out[:m].tolist() == [1, 1, 1]
    keys = np.array([2, 2, 5], np.uint64)
    m, distinct = _count_sorted_keys(keys, np.array([1, 2, 3]), np.empty(0, np.uint64), np.empty(0, np.int64), keys, out)
    assert m == distinct == 2 and keys[:m].tolist() == [2, 5] and out[:m].tolist() == [3, 3]


def test_states_new_to_a_large_counter_are_counted_beside_it():
    rng = np.random.default_rng(8)
    for c in (64, 100):
        first = rng.integers(0, 256, (300_000, n_bytes_for(c)), dtype=np.uint8)
        second = rng.integers(0, 256, (300_000, n_bytes_for(c)), dtype=np.uint8)  # all new
        counter = StateCounter(c)
        counter.add(first)
        counter.add(second)
        counter.add(first[:1000])
        assert counter.n_distinct == 600_000
        assert as_dict(*counter.result()) == unique_dict(np.concatenate([first, second, first[:1000]]))


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


@pytest.mark.parametrize(
    "value, error, message",
    [
        (np.arange(6).reshape(2, 3), TypeError, "float16, float32, float64 or bool"),
        (np.ones((2, 3), np.complex64), TypeError, "got dtype complex64"),
        (np.array([[1.0, None]], dtype=object), TypeError, "got dtype object"),
        (np.ones((2, 3), np.uint8), TypeError, "cast other data to float"),
        ([[1.0, 2.0]], TypeError, "numpy.ndarray, got list"),
        (np.float32(1.0), TypeError, "numpy.ndarray"),
        (np.array(1.0, np.float32), ValueError, "rank >= 1"),
        (np.ones((3, 0), np.float32), ValueError, "0 neurons"),
    ],
)
def test_pack_rejects_bad_arrays(value, error, message):
    with pytest.raises(error, match=message):
        pack(value)


@pytest.mark.parametrize(
    "axis, error, message",
    [
        (3, ValueError, r"channel_axis 3 is out of range for an array of rank 3 \(valid: -3\.\.2\)"),
        (-4, ValueError, "out of range"),
        (1.0, TypeError, "channel_axis must be an int"),
        (True, TypeError, "channel_axis must be an int"),
        ("1", TypeError, "channel_axis must be an int"),
    ],
)
def test_pack_rejects_bad_channel_axis(axis, error, message):
    with pytest.raises(error, match=message):
        pack(np.ones((2, 3, 4), np.float32), axis)


def test_pack_accepts_numpy_integer_axis():
    x = np.random.default_rng(0).standard_normal((2, 9, 3)).astype(np.float32)
    np.testing.assert_array_equal(pack(x, np.int64(1)), reference_pack(x, 1))


@pytest.mark.parametrize(
    "packed, neurons, error, message",
    [
        (np.zeros((2, 2), np.float32), 9, TypeError, "uint8 numpy array"),
        ([[0, 1]], 9, TypeError, "got list"),
        (np.zeros((2, 3), np.uint8), 9, ValueError, r"shape \(n_states, 2\), got \(2, 3\)"),
        (np.zeros(4, np.uint8), 9, ValueError, r"got \(4,\)"),
        (np.zeros((2, 2, 2), np.uint8), 9, ValueError, "got"),
        (np.zeros((2, 2), np.uint8), 0, ValueError, "n_neurons must be a positive int"),
        (np.zeros((2, 2), np.uint8), 2.5, ValueError, "n_neurons must be a positive int"),
    ],
)
def test_unpack_rejects_bad_input(packed, neurons, error, message):
    with pytest.raises(error, match=message):
        unpack(packed, neurons)


@pytest.mark.parametrize("c", [9, 100])
def test_counter_add_rejects_bad_input(c):
    counter = StateCounter(c)
    width = n_bytes_for(c)
    with pytest.raises(TypeError, match="uint8 numpy array"):
        counter.add(np.zeros((2, width), np.int8))
    with pytest.raises(TypeError, match="uint8 numpy array"):
        counter.add(np.zeros((2, width), np.float32))
    with pytest.raises(ValueError, match=f"shape \\(n_states, {width}\\), got \\(2, {width + 1}\\)"):
        counter.add(np.zeros((2, width + 1), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        counter.add(np.zeros(width, np.uint8))
    with pytest.raises(ValueError, match="shape"):
        counter.add(np.zeros((1, 2, width), np.uint8))
    assert counter.total == 0 and counter.n_distinct == 0


@pytest.mark.parametrize("neurons", [0, -3, 2.0, True, "8", None])
def test_counter_needs_positive_int_neurons(neurons):
    with pytest.raises(ValueError, match="positive number of neurons"):
        StateCounter(neurons)


@pytest.mark.parametrize("c, n", [(32, 3_200_000), (100, 1_600_000)])
def test_buffer_shrinks_while_states_repeat(c, n):
    """Once flushes find their states counted already, the buffer shrinks to
    1/_ABSORB_RATIO of the largest run: memory stays near the distinct states."""
    rng = np.random.default_rng(c)
    pool = rng.integers(0, 256, (n, n_bytes_for(c)), dtype=np.uint8)
    counter = StateCounter(c)
    for start in range(0, n, 100_000):
        counter.add(pool[start : start + 100_000])
    largest = len(counter._runs[0])
    filled = []
    for _ in range(3):
        for start in range(0, n, 100_000):
            counter.add(pool[start : start + 100_000])
            filled.append(counter._n_pending)
    # The repeats were seen within a batch (the first one also flushed the new states of
    # the first pass), not once the buffer held as many states as the largest run.
    assert max(filled[1:]) < -(-largest // engine._ABSORB_RATIO) + 100_000
    assert counter._repeating
    largest = len(counter._runs[0])
    assert counter._buffer_rows() == -(-largest // engine._ABSORB_RATIO)
    state_bytes = 8 * counter._n_words + (8 if counter._n_words == 1 else 24)  # key or words, refs, count
    assert counter.nbytes <= 1.3 * n * state_bytes  # 1.5x while the buffer followed the largest run
    ids, counts = counter.result(sort=True)
    expected_ids, expected_counts = np.unique(pool, axis=0, return_counts=True)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(counts, 4 * expected_counts)


@pytest.mark.parametrize("c", [40, 100])
def test_merging_absorbs_known_states_and_appends_new_ones(c):
    rng = np.random.default_rng(c)
    known = np.unique(rng.integers(0, 256, (100_000, n_bytes_for(c)), dtype=np.uint8), axis=0)
    new = rng.integers(0, 256, (20_000, n_bytes_for(c)), dtype=np.uint8)
    target, same, other = StateCounter(c), StateCounter(c), StateCounter(c)
    target.add(known)
    assert target.n_distinct == len(known)  # counted into a run
    same.add(known[::2])
    other.add(new)
    target.merge(same)  # a sample of it is known: absorbed into the run, no run added
    assert len(target._runs) == 1 and target._repeating
    target.merge(other)  # mostly new: appended without absorbing
    assert not target._repeating and len(target._runs) == 2
    if target._n_words == 1:  # the run shares the other counter's keys, unread and uncopied
        assert np.shares_memory(target._runs[1].keys, other._runs[0].keys)
    expected = unique_dict(np.concatenate([known, known[::2], new]))
    assert as_dict(*target.result()) == expected
    assert as_dict(*same.result()) == unique_dict(known[::2])  # merged-from counters are untouched


@pytest.mark.parametrize("c", [24, 40, 72, 200])
@pytest.mark.parametrize("seed", range(3))
def test_mixed_streams_of_repeats_new_states_and_merges_equal_numpy(c, seed, monkeypatch):
    """Small buffers and samples make every path run many times: buffers that
    fill with new states then repeats, absorbing into several runs, merges of
    known and new states, compaction in the middle of a stream."""
    monkeypatch.setattr(engine, "_BUFFER_MIN_BYTES", 1 << 12)
    monkeypatch.setattr(engine, "_BUFFER_MAX_BYTES", 1 << 15)
    monkeypatch.setattr(engine, "_SAMPLE_ROWS", 64)
    rng = np.random.default_rng(seed)
    width = n_bytes_for(c)
    pool = rng.integers(0, 256, (3_000, width), dtype=np.uint8)
    counter, seen = StateCounter(c), []
    for _ in range(60):
        kind = rng.integers(0, 5)
        size = int(rng.integers(1, 2_500))
        if kind <= 1:  # repeats from the pool
            batch = pool[rng.integers(0, len(pool), size)]
        elif kind == 2:  # new states
            batch = rng.integers(0, 256, (size, width), dtype=np.uint8)
        elif kind == 3:  # a counter of part pool, part new states, merged
            batch = np.concatenate([pool[rng.integers(0, len(pool), size)],
                                    rng.integers(0, 256, (size // 2, width), dtype=np.uint8)])  # fmt: skip
            other = StateCounter(c)
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
