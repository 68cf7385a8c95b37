"""pack, unpack and the checks of packed states, against numpy's packbits."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tensorstate_onnx.engine import n_bytes_for, pack, packing, unpack
from tensorstate_onnx.errors import OptionError, OptionTypeError, PackedStateError, TensorStateError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


def reference_pack(x, axis):
    c = x.shape[axis]
    return np.packbits(np.moveaxis(x, axis, -1).reshape(-1, c) > 0, axis=-1, bitorder="little")


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
    values, lo, hi = packing._comparable(x)
    buffer = np.zeros(3 * 37 * 3 + 16, np.uint8)
    out = buffer[offset : offset + 3 * 37 * 3].reshape(-1, 3)
    packing._run_block(values, lo, hi, out)
    np.testing.assert_array_equal(out, reference_pack(x, -1))
    assert not buffer[:offset].any() and not buffer[offset + out.size :].any()


@pytest.mark.parametrize("kernel", ["dispatched", "columns"])
@pytest.mark.parametrize("channels", [9, 20, 33, 56])
def test_channels_first_kernel_writes_only_its_own_rows(channels, kernel):
    """States of 2..7 bytes from large maps are stored 8 bytes at a time, each
    store spilling into the next row: never past the rows it was given
    (threads pack the rows beyond), by the kernel pack() picks for them and
    by the general channels-first kernel (which views it cannot reshape into
    whole samples, and threads' parts of a sample, go to)."""
    rng = np.random.default_rng(channels)
    x = random_values(rng, (2, channels, 16, 20), np.float32)  # 320 positions: the last group ends the rows
    values, lo, hi = packing._comparable(x)
    width = packing.n_bytes_for(channels)
    rows = 2 * 16 * 20
    buffer = np.full(rows * width + 16, 0xAA, np.uint8)
    out = buffer[: rows * width].reshape(rows, width)
    view = values.transpose(0, 2, 3, 1).reshape(2, 320, channels)
    if kernel == "columns":
        packing._pack_cols(view.transpose(0, 2, 1), lo, hi, out, packing._NO_WORDS)
    else:
        assert packing._sample_runs(view) is not None  # the small-map kernel, for maps of any size
        packing._run_block(view, lo, hi, out)
    np.testing.assert_array_equal(out, reference_pack(x, 1))
    assert (buffer[rows * width :] == 0xAA).all(), "a store ran past the rows it was given"


@pytest.fixture
def threads_from_4_mib(monkeypatch):
    """Inputs of 4 MiB or more packed by threads (as on machines where that pays), to test them on small arrays."""
    monkeypatch.setattr(packing, "_PARALLEL_MIN_BYTES", 1 << 22)
    packing._PLANS.clear()
    yield
    packing._PLANS.clear()


@pytest.mark.parametrize("channels", [8, 12])
@pytest.mark.parametrize("layout", ["first", "last"])
def test_pack_large_inputs_use_threads_and_stay_exact(channels, layout, threads_from_4_mib):
    rng = np.random.default_rng(channels)
    shape = (130, channels, 33, 31) if layout == "first" else (130, 33, 31, channels)
    x = random_values(rng, shape, np.float32)
    assert x.nbytes > packing._PARALLEL_MIN_BYTES
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


# ------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "value, error, message",
    [
        (np.arange(6).reshape(2, 3), OptionTypeError, "float16, float32, float64 or bool"),
        (np.ones((2, 3), np.complex64), OptionTypeError, "got dtype complex64"),
        (np.array([[1.0, None]], dtype=object), OptionTypeError, "got dtype object"),
        (np.ones((2, 3), np.uint8), OptionTypeError, "cast other data to float"),
        ([[1.0, 2.0]], OptionTypeError, "numpy.ndarray, got list"),
        (np.float32(1.0), OptionTypeError, "numpy.ndarray"),
        (np.array(1.0, np.float32), OptionError, "rank >= 1"),
        (np.ones((3, 0), np.float32), OptionError, "0 neurons"),
    ],
)
def test_pack_rejects_bad_arrays(value, error, message):
    with pytest.raises(error, match=message) as info:
        pack(value)
    assert isinstance(info.value, TensorStateError)


@pytest.mark.parametrize(
    "axis, error, message",
    [
        (3, OptionError, r"channel_axis 3 is out of range for an array of rank 3 \(valid: -3\.\.2\)"),
        (-4, OptionError, "out of range"),
        (1.0, OptionTypeError, "channel_axis must be an int"),
        (True, OptionTypeError, "channel_axis must be an int"),
        ("1", OptionTypeError, "channel_axis must be an int"),
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
        (np.zeros((2, 2), np.float32), 9, OptionTypeError, "uint8 numpy array"),
        ([[0, 1]], 9, OptionTypeError, "got list"),
        (np.zeros((2, 3), np.uint8), 9, PackedStateError, r"shape \(n_states, 2\), got \(2, 3\)"),
        (np.zeros(4, np.uint8), 9, PackedStateError, r"got \(4,\)"),
        (np.zeros((2, 2, 2), np.uint8), 9, PackedStateError, "got"),
        (np.zeros((2, 2), np.uint8), 0, OptionError, "n_neurons must be a positive int"),
        (np.zeros((2, 2), np.uint8), 2.5, OptionError, "n_neurons must be a positive int"),
    ],
)
def test_unpack_rejects_bad_input(packed, neurons, error, message):
    with pytest.raises(error, match=message):
        unpack(packed, neurons)


@pytest.mark.parametrize(
    "n_neurons, rows, bad_row",
    [
        (3, [[0x01], [0x81]], 1),  # would count as two states that unpack to one
        (3, [[0x08], [0x01]], 0),
        (13, [[0xFF, 0x1F], [0xFF, 0x20], [0x00, 0xE0]], 1),  # the first bad row is named
        (100, [[0] * 12 + [0x0F], [0] * 12 + [0x10]], 1),
    ],
)
def test_packed_states_with_unused_bits_set_are_refused(n_neurons, rows, bad_row):
    packed = np.array(rows, np.uint8)
    message = f"row {bad_row} of the packed states has bits set above neuron {n_neurons - 1}.*unused high bits must be 0"
    with pytest.raises(PackedStateError, match=message) as info:
        unpack(packed, n_neurons)
    assert isinstance(info.value, ValueError)
    # Fine once they are cleared, and in a non-contiguous view.
    packed[:, -1] &= (1 << (n_neurons % 8)) - 1
    np.testing.assert_array_equal(pack(unpack(packed, n_neurons)), packed)
    wide = np.zeros((len(rows), packed.shape[1] + 3), np.uint8)
    wide[:, 1 : 1 + packed.shape[1]] = packed
    wide[bad_row, 1 + packed.shape[1] - 1] |= 0x80
    with pytest.raises(PackedStateError, match=f"row {bad_row} "):
        unpack(wide[:, 1 : 1 + packed.shape[1]], n_neurons)


def test_every_bit_of_the_last_byte_is_used_by_a_multiple_of_8_neurons():
    packed = np.full((3, 2), 0xFF, np.uint8)
    assert unpack(packed, 16).all()


# ------------------------------------------- channels-first, small feature maps

MAP_CHANNELS = [1, 7, 8, 9, 63, 64, 65, 1280, 4096]
MAP_SIDES = [(1, 1), (2, 2), (3, 3), (7, 7), (8, 8), (5, 13), (16, 16)]  # 64+ positions: lanes made directly


def small_map_path(x, axis):
    """Whether pack() hands ``x`` to the small-map kernel (checked so that the
    tests below keep testing it if the dispatch changes)."""
    values = np.moveaxis(packing._comparable(x)[0], axis, -1)
    return any(packing._sample_runs(view) is not None for view in packing._state_blocks(values))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("side", MAP_SIDES)
@pytest.mark.parametrize("channels", MAP_CHANNELS)
def test_pack_channels_first_small_maps(channels, side, dtype):
    rng = np.random.default_rng(channels * 100 + side[0])
    for batch in (1, 5):
        x = random_values(rng, (batch, channels, *side), dtype)
        if side != (1, 1) and channels > 1:  # otherwise channels-last in memory
            assert small_map_path(x, 1)
        np.testing.assert_array_equal(pack(x, 1), reference_pack(x, 1))


@pytest.mark.parametrize("channels", [7, 9, 64, 65, 1280])
def test_pack_small_maps_of_sliced_inputs(channels):
    """Samples apart in memory (a batch step, a channel slice, a negative
    batch step) go through the small-map kernel sample by sample, and so do
    samples whose values are equally spaced (a step along the last axis);
    other positions (part of each row) go to the general channels-first
    kernel. All stay exact."""
    rng = np.random.default_rng(channels)
    base = random_values(rng, (7, channels + 3, 3, 3), np.float32)
    wide = random_values(rng, (7, channels, 3, 6), np.float32)
    views = {
        "batch step": (base[::2, :channels], True),
        "channel slice": (base[:, 1 : channels + 1], True),
        "negative batch step": (base[::-3, :channels], True),
        "every other column": (wide[..., ::2], True),
        "first half of each row": (wide[..., :3], False),
        "odd batch": (np.ascontiguousarray(base[:3, :channels]), True),
    }
    for name, (view, small) in views.items():
        assert small_map_path(view, 1) == small, name
        np.testing.assert_array_equal(pack(view, 1), reference_pack(view, 1), err_msg=name)


def test_pack_small_maps_special_values():
    """NaN (any sign), -0.0, +0.0, -inf and negatives never fire; +inf and the
    smallest subnormals do, at every channel and position of a small map."""
    for dtype in (np.float16, np.float32, np.float64):
        with np.errstate(over="ignore"):
            special = np.array(SPECIALS, dtype=dtype)
        rng = np.random.default_rng(len(special))
        x = rng.choice(special, (3, 65, 3, 3))
        assert small_map_path(x, 1)
        np.testing.assert_array_equal(pack(x, 1), reference_pack(x, 1))
        for value in (np.nan, -0.0, 0.0, -np.inf, np.inf):
            filled = np.full((2, 9, 2, 2), value, dtype)
            expected = np.full((8, 2), 0xFF if value > 0 else 0, np.uint8)
            expected[:, 1] &= 0x01
            np.testing.assert_array_equal(pack(filled, 1), expected)


@pytest.mark.parametrize("side", [2, 3, 8])
@pytest.mark.parametrize("channels", [8, 13, 64])
def test_pack_small_maps_at_every_output_alignment(channels, side):
    """The kernel stores 8 bytes at a time at any address, and with fewer
    than 8 bytes per state it stores past a sample's rows (into the next
    sample's): nothing may land outside the output rows it is given."""
    rng = np.random.default_rng(channels)
    x = random_values(rng, (5, channels, side, side), np.float32)
    values, lo, hi = packing._comparable(np.moveaxis(x, 1, -1))
    (view,) = packing._state_blocks(values)
    width = n_bytes_for(channels)
    rows = 5 * side * side
    for offset in range(9):
        buffer = np.full(rows * width + 32, 0xA5, np.uint8)  # stray zeros would show
        out = buffer[offset : offset + rows * width].reshape(-1, width)
        packing._run_block(view, lo, hi, out)
        np.testing.assert_array_equal(out, reference_pack(x, 1))
        assert (buffer[:offset] == 0xA5).all() and (buffer[offset + out.size :] == 0xA5).all()


def test_pack_small_maps_of_large_samples_and_many_threads(threads_from_4_mib):
    """Samples larger than the kernel's chunk are split between chunks by
    groups of channels (with 340 channels of 7x7, 41 groups and then the last
    2, done as the last 8); large inputs are split between threads by samples."""
    rng = np.random.default_rng(3)
    for shape in [(3, 5000, 7, 7), (2, 340, 7, 7), (2, 340, 8, 8), (2, 1001, 9, 9)]:
        x = random_values(rng, shape, np.float32)
        assert x[0].size > packing._MAP_CHUNK and small_map_path(x, 1)
        np.testing.assert_array_equal(pack(x, 1), reference_pack(x, 1))
    many = random_values(rng, (1001, 129, 3, 3), np.float32)
    assert many.nbytes > packing._PARALLEL_MIN_BYTES
    np.testing.assert_array_equal(pack(many, 1), reference_pack(many, 1))


# ------------------------------------------------------------------ plans


CONTIGUOUS_LAYOUTS = [
    ((32, 512, 1, 1), 1), ((32, 512), 1), ((32, 13), -1), ((32, 96, 6, 6), 1), ((32, 16, 8, 8), 1),
    ((4, 9, 17, 17), 1), ((6, 6, 5), 1), ((3, 4, 5, 24), -1), ((2, 3, 40), 0), ((5, 2, 3, 4), 2),
]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.bool_])
@pytest.mark.parametrize(("shape", "axis"), CONTIGUOUS_LAYOUTS)
def test_planned_layouts_pack_new_data_exactly(shape, axis, dtype):
    """A C-contiguous layout is planned on its first call; later calls with
    other values of that layout go through the plan and stay exact."""
    rng = np.random.default_rng(len(shape) * 31 + shape[-1])
    packing._PLANS.clear()
    for _ in range(3):
        x = random_values(rng, shape, dtype)
        np.testing.assert_array_equal(pack(x, axis), reference_pack(x, axis))
    assert packing._PLANS[(np.dtype(dtype), shape, axis)] is not None


def test_plans_serve_only_their_own_layout():
    """A plan is keyed by dtype, shape and the axis as given: a strided view,
    a Fortran-ordered copy or a transposed view of the same shape, another
    dtype or axis, and a bool axis all take the checked path."""
    rng = np.random.default_rng(7)
    x = random_values(rng, (8, 24, 4, 4), np.float32)
    packing._PLANS.clear()
    np.testing.assert_array_equal(pack(x, 1), reference_pack(x, 1))
    assert list(packing._PLANS) == [(np.dtype(np.float32), (8, 24, 4, 4), 1)]
    bigger = random_values(rng, (8, 48, 4, 4), np.float32)
    others = [bigger[:, ::2], np.asfortranarray(x), random_values(rng, (8, 4, 4, 24), np.float32).transpose(0, 3, 1, 2)]
    for other in others:
        assert other.shape == x.shape
        np.testing.assert_array_equal(pack(other, 1), reference_pack(other, 1))
    np.testing.assert_array_equal(pack(x, -3), reference_pack(x, 1))
    np.testing.assert_array_equal(pack(x, 2), reference_pack(x, 2))
    np.testing.assert_array_equal(pack(x.astype(np.float64), 1), reference_pack(x, 1))
    with pytest.raises(OptionTypeError, match="channel_axis must be an int"):
        pack(x, True)


def test_plans_stay_bounded_and_skip_what_they_cannot_serve():
    """Inputs of many shapes (sequences of every length) do not grow the
    plans without bound; inputs large enough for threads, empty ones and a
    single channel are not planned."""
    rng = np.random.default_rng(11)
    packing._PLANS.clear()
    for length in range(1, packing._MAX_PLANS + 40):
        pack(np.ones((1, length, 8), np.float32), -1)
    assert 0 < len(packing._PLANS) <= packing._MAX_PLANS
    packing._PLANS.clear()
    large = random_values(rng, (packing._PARALLEL_MIN_BYTES // 4 // 64 + 1, 64), np.float32)
    for x, axis in [(large, 1), (np.ones((0, 8), np.float32), 1), (random_values(rng, (5, 1, 3), np.float32), 1)]:
        np.testing.assert_array_equal(pack(x, axis), reference_pack(x, axis))
        assert packing._PLANS[(x.dtype, x.shape, axis)] is None
