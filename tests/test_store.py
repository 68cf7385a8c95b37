import re

import numpy as np
import pytest

import zarr

from tensorstate_onnx import PackedStateError, StorageExistsError, StoreError
from tensorstate_onnx.store import (
    ChunkedRows, StaleStoreSweep, StateStore, check_storage_root, store_dirname, unique_store_dirname,
)


def _rows(n, n_bytes, seed=0, n_neurons=None):
    """Random packed rows; of ``n_neurons`` (default: every bit of ``n_bytes``), the
    unused high bits of the last byte zero, as pack() leaves them."""
    rows = np.random.default_rng(seed).integers(0, 256, (n, n_bytes), dtype=np.uint8)
    if n_neurons is not None and n_neurons % 8:
        rows[:, -1] &= (1 << (n_neurons % 8)) - 1
    return rows


@pytest.mark.parametrize("n_neurons", [1, 12, 64, 1000])
def test_memory_round_trip_in_many_small_appends(n_neurons):
    n_bytes = (n_neurons + 7) // 8
    data = _rows(20_000, n_bytes, n_neurons=n_neurons)
    store = StateStore(n_neurons)
    for start in range(0, len(data), 777):
        store.append(data[start : start + 777])
    assert len(store) == len(data)
    assert np.array_equal(store.read(), data)
    assert np.array_equal(store.read(slice(100, 200)), data[100:200])
    index = np.array([5, 19_999, 0, 5])
    assert np.array_equal(store.read(index), data[index])


def test_appends_larger_than_a_chunk_and_flushes_in_between():
    store = StateStore(4096)  # 512-byte rows: a chunk holds 8192 rows
    data = _rows(30_000, 512)
    store.append(data[:10])
    store.flush()
    store.append(data[10:20_000])
    store.append(data[20_000:])
    assert np.array_equal(store.array[:], data)


def test_memory_store_keeps_the_rows_appended_and_builds_its_array_when_asked():
    store = StateStore(4096, metadata={"name": "probe"})  # 512-byte rows: a chunk holds 8192 rows
    data = _rows(20_000, 512)
    buffer = data[:5000].copy()
    store.append(buffer)
    buffer[:] = 0  # the caller reuses its buffer
    store.append(data[5000:9000])
    assert store.rows_written == len(store) == 9000  # nothing waits in a buffer
    assert np.array_equal(store.read(), data[:9000])
    assert np.array_equal(store.read(slice(8000, 8500)), data[8000:8500])  # across a chunk boundary
    assert np.array_equal(store.read(slice(None, None, -3)), data[:9000][::-3])
    assert np.array_equal(store.read(np.array([8191, 8192, 0, 8191])), data[[8191, 8192, 0, 8191]])
    assert store.read(slice(5, 5)).shape == (0, 512)
    array = store.array
    assert array.shape == (9000, 512) and np.array_equal(array[:], data[:9000])
    assert array.chunks == (8192, 512) and array.compressors[0].cname.value == "lz4"
    assert dict(array.attrs) == store.metadata == {"n_neurons": 4096, "name": "probe", "rows_written": 9000, "complete": False, "every_chunk_written": True}
    store.append(data[9000:])
    store.mark_complete()
    assert store.array is array and np.array_equal(array[:], data)  # brought up to date
    assert array.attrs["complete"] is True and store.metadata["complete"] is True and store.complete
    store.append(data[:0])
    assert store.complete
    store.append(data[:1])
    assert not store.complete and store.metadata["rows_written"] == 20_001
    with pytest.raises(IndexError, match=r"rows must lie in \[0, 20001\)"):
        store.read(np.array([20_001]))


def test_directory_store_reopens_with_metadata(tmp_path):
    data = _rows(5000, 3, n_neurons=20)
    path = tmp_path / "conv1"
    store = StateStore(20, path, {"name": "conv1:after", "node": "/conv1/Conv", "states_per_instance": 576})
    store.append(data)
    store.flush()
    reopened = StateStore.open(path)
    assert reopened.n_neurons == 20
    assert reopened.metadata == {
        "n_neurons": 20, "name": "conv1:after", "node": "/conv1/Conv", "states_per_instance": 576,
        "rows_written": 5000, "complete": False, "every_chunk_written": True,
    }  # fmt: skip
    assert np.array_equal(reopened.read(), data)
    reopened.append(data[:3])
    assert len(StateStore.open(path)) == 5000  # buffered rows reach the disk on flush
    reopened.flush()
    assert np.array_equal(StateStore.open(path).read()[-3:], data[:3])


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_rows_with_bits_above_the_last_neuron_are_refused_and_nothing_is_kept(tmp_path, on_disk):
    store = StateStore(20, tmp_path / "probe" if on_disk else None)
    good = _rows(50, 3, n_neurons=20)
    store.append(good)
    bad = _rows(40, 3, seed=2, n_neurons=20)
    bad[17, 2] |= 0x40  # neuron 22 of 20
    with pytest.raises(PackedStateError, match=r"StateStore.append\(\): row 17 .* bits set above neuron 19"):
        store.append(bad)
    store.flush()
    assert np.array_equal(store.read(), good)


def test_existing_store_is_never_overwritten_unless_asked(tmp_path):
    path = tmp_path / "probe"
    first = StateStore(8, path)
    first.append(_rows(10, 1))
    first.flush()
    with pytest.raises(StorageExistsError, match="overwrite=True"):
        StateStore(8, path)
    assert len(StateStore.open(path)) == 10
    StateStore(8, path, overwrite=True)
    assert len(StateStore.open(path)) == 0


def test_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no state store"):
        StateStore.open(tmp_path / "missing")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a tensorstate-onnx state store"):
        StateStore.open(tmp_path / "junk")


def test_bad_rows_and_indices():
    store = StateStore(16)
    with pytest.raises(ValueError, match="2 bytes"):
        store.append(np.zeros((3, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        store.append(np.zeros((3, 2), np.int16))
    with pytest.raises(TypeError, match="appends a numpy array of packed states, not list"):
        store.append([[1, 2]])
    store.append(np.zeros((4, 2), np.uint8))
    with pytest.raises(IndexError, match="rows must lie"):
        store.read(np.array([4]))
    for n_neurons in (0, -3, 2.7, True, "20", None):
        with pytest.raises(ValueError, match=rf"positive int number of neurons, got {re.escape(repr(n_neurons))}"):
            StateStore(n_neurons)
    with pytest.raises(TypeError, match="path is a str or os.PathLike .*not int"):
        StateStore(20, 5)
    assert StateStore(np.int32(20)).n_bytes == 3


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_every_kind_of_row_selection_reads_what_numpy_does(tmp_path, on_disk):
    from tensorstate_onnx import IndexOutOfRangeError, OptionTypeError

    data = _rows(1000, 3, n_neurons=20)
    store = StateStore(20, tmp_path / "probe" if on_disk else None)
    store.append(data)
    mask = np.zeros(1000, bool)
    mask[[3, 500, 999]] = True
    selections = {
        "mask": (mask, data[mask]), "int": (5, data[[5]]), "numpy int": (np.int64(7), data[[7]]),
        "empty list": ([], data[:0]), "list": ([4, 2, 4], data[[4, 2, 4]]),
        "reversed": (slice(None, None, -1), data[::-1]), "step -3": (slice(10, 0, -3), data[10:0:-3]),
        "step 7": (slice(1, 900, 7), data[1:900:7]), "uint index": (np.array([9, 1], np.uint16), data[[9, 1]]),
    }  # fmt: skip
    for name, (rows, want) in selections.items():
        assert np.array_equal(store.read(rows), want), name
    with pytest.raises(IndexOutOfRangeError, match=r"one value per row \(1000\), got shape \(10,\)"):
        store.read(mask[:10])
    with pytest.raises(OptionTypeError, match=r"not list \(float64\)"):
        store.read([1.7])
    with pytest.raises(OptionTypeError, match=r"not str"):
        store.read("abc")
    with pytest.raises(OptionTypeError, match=r"one-dimensional, got shape \(2, 2\)"):
        store.read(np.array([[1, 2], [3, 4]]))


def test_storage_root_must_be_a_free_directory(tmp_path):
    check_storage_root(tmp_path / "new")  # missing: fine
    (tmp_path / "empty").mkdir()
    check_storage_root(tmp_path / "empty")  # empty: fine
    (tmp_path / "file").write_text("x")
    for overwrite in (False, True):
        with pytest.raises(StorageExistsError, match="is not a directory; choose a new directory"):
            check_storage_root(tmp_path / "file", overwrite)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("y")
    with pytest.raises(StorageExistsError, match=r"is not empty; .*overwrite=True \(--overwrite on the command line\)"):
        check_storage_root(tmp_path / "full")
    check_storage_root(tmp_path / "full", overwrite=True)
    assert (tmp_path / "file").read_text() == "x" and (tmp_path / "full" / "keep").read_text() == "y"


def test_a_store_path_under_a_file_is_refused_naming_the_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageExistsError, match=r"state store path .*sub lies under .*file, which is a file"):
        StateStore(20, tmp_path / "file" / "deeper" / "sub")
    assert (tmp_path / "file").read_text() == "x"


def test_the_stale_store_sweep_deletes_only_other_stores_and_only_once(tmp_path):
    for name in ("mine", "stale", "other_stale"):
        store = StateStore(8, tmp_path / name)
        store.append(np.ones((3, 1), np.uint8))
        store.mark_complete()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "zarr.json").write_text('{"attributes": {"not": "a store"}}')
    (tmp_path / "readme.txt").write_text("mine")
    sweep = StaleStoreSweep(tmp_path, ["mine", "not_written_yet"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes", "other_stale", "readme.txt", "stale"]
    sweep.sweep()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "notes", "readme.txt"]
    assert len(StateStore.open(tmp_path / "mine").read()) == 3
    StateStore(8, tmp_path / "later")  # written after the sweep: a sweep runs once
    sweep.sweep()
    assert (tmp_path / "later").is_dir()


def test_store_dirnames_are_safe_and_unique_per_storage_path():
    assert store_dirname("features.0:after") == "features.0_after"
    assert store_dirname("../..") == "probe"
    taken: set[str] = set()
    names = [unique_store_dirname(name, taken) for name in ("a:b", "a b", "a_b", "a:b/")]
    assert names == ["a_b", "a_b_2", "a_b_3", "a_b_4"]
    assert taken == set(names)


def test_chunked_rows_write_up_to_chunk_boundaries_and_keep_copies():
    writes = []
    rows = ChunkedRows(4, lambda first, data: writes.append((first, data.copy())), written=3)
    batch = np.arange(6, dtype=np.uint8).reshape(3, 2)
    rows.append(batch)  # 3 rows held: less than a chunk
    batch[:] = 99  # the caller reuses its buffer
    assert writes == [] and rows.pending_rows == 3
    rows.append(np.full((3, 2), 7, np.uint8))  # 6 held: rows 3..7 end on a chunk boundary, 1 row waits
    assert [(first, len(data)) for first, data in writes] == [(3, 5)]
    assert np.array_equal(writes[0][1][:3], np.arange(6).reshape(3, 2))
    rows.append(np.empty((0, 2), np.uint8))
    rows.flush()
    assert [(first, len(data)) for first, data in writes] == [(3, 5), (8, 1)]
    assert rows.written == 9 and rows.pending_rows == 0


# --------------------------------------------------------------------------- integrity


def _disk_store(path, rows, n_neurons=16):
    store = StateStore(n_neurons, path)
    store.append(rows)
    store.flush()
    return store


def _raw(path):
    return zarr.open_array(zarr.storage.LocalStore(path), mode="r+")


def test_rows_written_counts_only_rows_on_disk_and_complete_is_set_at_the_end(tmp_path):
    path = tmp_path / "probe"
    store = StateStore(4096, path)  # 8192 rows a chunk
    data = _rows(20_000, 512)
    store.append(data[:10_000])
    assert store.rows_written == 8192 and len(store) == 10_000  # the rest waits for a whole chunk
    assert _raw(path).attrs["rows_written"] == 8192 and store.complete is False
    store.mark_complete()
    assert store.complete and _raw(path).attrs["rows_written"] == 10_000 and _raw(path).attrs["complete"] is True
    store.append(data[10_000:10_001])
    assert _raw(path).attrs["complete"] is False, "an append reopens the run"
    assert StateStore.open(path).complete is False


def test_a_store_grown_but_not_written_reopens_with_its_written_rows(tmp_path):
    # A kill between growing the array and writing its chunk left zeros that looked like states.
    path = tmp_path / "probe"
    data = _rows(100, 2)
    _disk_store(path, data)
    _raw(path).resize((1_000_000, 2))
    reopened = StateStore.open(path)
    assert len(reopened) == 100 and reopened.complete is False
    assert np.array_equal(reopened.read(), data)
    assert np.array_equal(reopened.array[:], data)
    assert _raw(path).shape == (100, 2), "the unwritten tail is cut off"
    reopened.append(data[:5])
    reopened.flush()
    assert np.array_equal(StateStore.open(path).read(), np.concatenate([data, data[:5]]))


def test_rows_written_but_not_counted_are_dropped(tmp_path):
    # A kill after a chunk was written but before the count was raised.
    path = tmp_path / "probe"
    data = _rows(100, 2)
    _disk_store(path, data)
    raw = _raw(path)
    raw.resize((150, 2))
    raw[100:] = _rows(50, 2, seed=1)
    assert np.array_equal(StateStore.open(path).read(), data)


@pytest.mark.parametrize(
    "attributes, message",
    [
        ({"n_neurons": 40}, "n_neurons attribute is 40, but its rows are 2 bytes wide"),
        ({"n_neurons": "16"}, "n_neurons attribute is '16'"),
        ({"n_neurons": 0}, "n_neurons attribute is 0"),
        ({"rows_written": 101}, "says 101 rows were written but holds 100"),
        ({"rows_written": -1}, "says -1 rows"),
        ({"rows_written": 2.5}, "says 2.5 rows"),
    ],
)
def test_metadata_that_contradicts_the_array_is_refused(tmp_path, attributes, message):
    path = tmp_path / "probe"
    _disk_store(path, _rows(100, 2))
    _raw(path).update_attributes(attributes)
    with pytest.raises(StoreError, match=message):
        StateStore.open(path)


def test_a_damaged_chunk_is_named(tmp_path):
    path = tmp_path / "probe"
    store = StateStore(4096, path)  # 8192 rows a chunk
    store.append(_rows(20_000, 512))
    store.mark_complete()
    chunk = path / "c" / "1" / "0"
    assert chunk.is_file()
    chunk.write_bytes(b"not a blosc frame" * 10)
    reopened = StateStore.open(path)
    assert reopened.read(slice(0, 8192)).shape == (8192, 512), "the sound chunk still reads"
    with pytest.raises(StoreError, match=r"damaged: chunk 1 \(rows 8192 to 16383\)"):
        reopened.read()
    with pytest.raises(StoreError, match="chunk 1"):
        reopened.read(np.array([0, 9000]))


def test_a_missing_chunk_is_refused_not_read_as_states_where_nothing_fired(tmp_path):
    path = tmp_path / "probe"
    store = StateStore(4096, path)  # 8192 rows a chunk
    rows = _rows(20_000, 512)
    rows[:8192] = 0  # a whole chunk of states where no neuron fired: still written
    store.append(rows)
    store.mark_complete()
    assert (path / "c" / "0" / "0").is_file()
    store.append(np.zeros((8192, 512), np.uint8))  # appended after reopening-free growth, too
    store.flush()
    assert StateStore.open(path).read(slice(20_000, 28_192)).sum() == 0
    (path / "c" / "1" / "0").unlink()
    reopened = StateStore.open(path)
    assert np.array_equal(reopened.read(slice(0, 8192)), rows[:8192]), "the chunks still there read"
    for rows_asked in (None, slice(8000, 9000), np.array([16_000, 9000])):
        with pytest.raises(StoreError, match=r"damaged: chunk 1 \(rows 8192 to 16383\) is missing"):
            reopened.read(rows_asked)
    with pytest.raises(StoreError, match=r"damaged: chunk 1 .* is missing"):
        reopened.array  # noqa: B018 (the zarr array itself would read it as zeros)
    reopened.append(np.zeros((8192, 512), np.uint8))  # a reopened store writes all-zero chunks too
    reopened.flush()
    assert (path / "c" / "3" / "0").is_file()
