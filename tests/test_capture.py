import threading

import numpy as np
import pytest

from tensorstate_onnx import (
    ModelInputError, NoStatesError, OptionError, OptionTypeError, StateCaptureProbe, StorageExistsError, entropy,
)
from tensorstate_onnx.capture import batch_axis, positions_kept
from tensorstate_onnx.engine import StateCounter
from tensorstate_onnx.store import StateStore


def _reference(x, axis):
    c = x.shape[axis]
    packed = np.packbits(np.moveaxis(x, axis, -1).reshape(-1, c) > 0, axis=-1, bitorder="little")
    ids, counts = np.unique(packed, axis=0, return_counts=True)
    return packed, {row.tobytes(): int(n) for row, n in zip(ids, counts, strict=True)}


def _as_dict(capture, index=None):
    return dict(zip(capture.state_ids(index), capture.counts(index).tolist(), strict=True))


@pytest.fixture
def batches():
    rng = np.random.default_rng(1)
    return [rng.standard_normal((n, 10, 3, 4)).astype(np.float32) for n in (5, 2, 7)]


def test_counts_entropy_and_efficiency_match_numpy(batches):
    capture = StateCaptureProbe("conv")
    for batch in batches:
        capture.record(batch, 1)
    everything = np.concatenate(batches)
    packed, expected = _reference(everything, 1)
    assert capture.state_count == 14 * 12
    assert capture.states_per_instance == 12
    assert _as_dict(capture) == expected
    assert capture.max_entropy() == 10.0
    assert capture.entropy() == pytest.approx(entropy(list(expected.values())))
    assert capture.entropy(2) == pytest.approx(entropy(list(expected.values()), 2))
    assert capture.entropy(None) == 10.0
    assert capture.efficiency() == pytest.approx(capture.entropy() / 10)
    assert capture.efficiency(1, 0) == pytest.approx(capture.entropy(1) / capture.entropy(0))
    assert np.array_equal(capture.states[:], packed)


def test_counts_by_instance_index(batches):
    capture = StateCaptureProbe("conv")
    for batch in batches:
        capture.record(batch, 1)
    everything = np.concatenate(batches)
    for index in ([0], [4, 5, 13], [-1], np.arange(14)):
        _, expected = _reference(everything[np.asarray(index)], 1)
        assert _as_dict(capture, index) == expected
    with pytest.raises(IndexError, match="14 instances"):
        capture.counts([14])
    for bad in (1.5, [0.0, 1.0], True):
        with pytest.raises(OptionError, match="by integer position"):
            capture.counts(bad)
    with pytest.raises(OptionError, match="selects no input instance"):
        capture.counts([])


@pytest.mark.parametrize(
    ("shape", "channel_axis", "batch_size", "preferred", "expected"),
    [
        ((4, 7, 12), 2, 4, 0, 0),  # batch first
        ((7, 4, 12), 2, 4, 0, 1),  # sequence first: the samples on axis 1
        ((7, 3, 4, 12), 3, 4, 0, 2),
        ((28, 12), 1, 4, 0, 0),  # flattened tokens [N*L, D] stay as they are
        ((7, 5, 12), 2, 4, 0, 0),  # no axis is the batch size
        ((7, 4, 4, 12), 3, 4, 0, 0),  # two candidates: nothing to choose by
        ((4, 4, 12), 2, 4, 0, 0),  # as long as axis 0: batch first
        ((4, 4, 12), 2, 4, 1, 1),  # ... unless an earlier batch showed axis 1
        ((4, 7, 12), 2, 4, 1, 0),  # an earlier axis that is not the batch size now gives way
        ((7, 12, 4), 1, 4, 0, 2),  # neurons on axis 1 (a conv after a transpose)
        ((12, 4, 7), 0, 4, 0, 0),  # neurons on axis 0: the whole tensor is one instance
        ((7, 4, 12), 2, None, 0, 0),  # batch size unknown (Keras: always axis 0)
    ],
)
def test_batch_axis_is_where_the_samples_lie(shape, channel_axis, batch_size, preferred, expected):
    assert batch_axis(shape, channel_axis, batch_size, preferred) == expected


def test_a_sequence_first_batch_is_recorded_batch_first_and_indexed_by_sample():
    rng = np.random.default_rng(3)
    seq_first = [rng.standard_normal((6, n, 9)).astype(np.float32) for n in (5, 6, 2)]  # [L, N, D]
    capture = StateCaptureProbe("lstm")
    for batch in seq_first:
        capture.record(batch, -1, batch_size=batch.shape[1])
    samples = np.concatenate([np.moveaxis(b, 1, 0) for b in seq_first])  # [N, L, D]
    packed, expected = _reference(samples, -1)
    assert capture.states_per_instance == 6
    np.testing.assert_array_equal(capture.states[:], packed)
    for index in ([0], [5], [10, 12], [-1]):
        _, wanted = _reference(samples[np.asarray(index)], -1)
        assert _as_dict(capture, index) == wanted
    assert capture.channel_axis == 2, "the probe reports its tensor's own neuron axis"


def test_positions_kept_under_a_mask():
    mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
    np.testing.assert_array_equal(positions_kept(mask, 6, 2, "p"), mask.ravel())  # one state per position
    assert positions_kept(mask, 2, 2, "p") is None  # one state per sample
    with pytest.raises(ModelInputError, match=r"gives 3 states for 1 sample; masks apply"):
        positions_kept(mask, 3, 1, "p")  # [1, L, D] position embeddings


def test_efficiency_orders_must_fall(batches):
    capture = StateCaptureProbe("conv")
    for batch in batches:
        capture.record(batch, 1)
    assert capture.efficiency(2, 1) == pytest.approx(capture.entropy(2) / capture.entropy(1))
    assert 0 < capture.efficiency(2, 1) <= 1
    for alpha1, alpha2 in ((1, 2), (1, 1), (0, float("inf"))):
        with pytest.raises(OptionError, match="needs alpha2 < alpha1"):
            capture.efficiency(alpha1, alpha2)


def test_varying_positions_per_instance_still_index_correctly():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((3, 9, 2, 2)).astype(np.float32)
    b = rng.standard_normal((2, 9, 5, 1)).astype(np.float32)
    capture = StateCaptureProbe("varying")
    capture.record(a, 1)
    capture.record(b, 1)
    assert capture.states_per_instance == -1
    _, expected = _reference(b[1:2], 1)
    assert _as_dict(capture, [4]) == expected


def test_keep_states_false_counts_without_raw_states(batches):
    capture = StateCaptureProbe("light", keep_states=False)
    for batch in batches:
        capture.record(batch, 1)
    assert _as_dict(capture) == _reference(np.concatenate(batches), 1)[1]
    with pytest.raises(NoStatesError, match="storage path"):
        capture.states
    with pytest.raises(NoStatesError, match="storage path"):
        capture.counts([0])


def test_disk_store_and_reopen(tmp_path, batches):
    path = tmp_path / "conv"
    capture = StateCaptureProbe("conv", disk_path=path, metadata={"node": "/conv/Conv"})
    for batch in batches:
        capture.record(batch, 1)
    capture.flush()
    reopened = StateStore.open(path)
    assert reopened.metadata["name"] == "conv" and reopened.metadata["node"] == "/conv/Conv"
    assert np.array_equal(reopened.read(), _reference(np.concatenate(batches), 1)[0])
    with pytest.raises(StorageExistsError):
        StateCaptureProbe("again", disk_path=path)
    capture.reset_states()
    capture.record(batches[0], 1)
    capture.flush()
    assert len(StateStore.open(path)) == 5 * 12


def test_reset_and_capture_off(batches):
    capture = StateCaptureProbe("p")
    capture.record(batches[0], 1)
    capture.reset_states()
    assert capture.state_count == 0
    with pytest.raises(NoStatesError, match="no states"):
        capture.counts()
    capture.capture_on = False
    capture.record(batches[0], 1)
    assert capture.state_count == 0
    capture.capture_on = True
    capture.record(np.ones((4, 3), np.float32), -1)  # a new layout after reset is fine
    assert capture.counts().tolist() == [4]
    assert capture.efficiency() == 0.0


def test_layout_change_without_reset_is_refused(batches):
    capture = StateCaptureProbe("p")
    capture.record(batches[0], 1)
    with pytest.raises(ValueError, match="reset_states"):
        capture.record(batches[0], 2)


def test_instances_do_not_share_state(batches):
    first, second = StateCaptureProbe("a"), StateCaptureProbe("b")
    first.record(batches[0], 1)
    assert second.state_count == 0 and second._batches == []


def test_merge_matches_single_capture(batches):
    whole, left, right = StateCaptureProbe("w"), StateCaptureProbe("l"), StateCaptureProbe("r")
    for batch in batches:
        whole.record(batch, 1)
    left.record(batches[0], 1)
    right.record(batches[1], 1)
    right.record(batches[2], 1)
    left.merge(right)
    assert _as_dict(left) == _as_dict(whole)
    assert left.state_count == whole.state_count
    assert np.array_equal(left.states[:], whole.states[:])  # its raw states came along, in order
    for instance in range(sum(batch.shape[0] for batch in batches)):
        assert sorted(left.counts(index=[instance])) == sorted(whole.counts(index=[instance]))


def test_merge_leaves_the_other_store_as_it_was_marked(batches, tmp_path):
    stopped = StateCaptureProbe("stopped", disk_path=tmp_path / "stopped")
    stopped.record(batches[0], 1)
    stopped.flush(complete=False)  # its run stopped early
    into = StateCaptureProbe("into")
    into.merge(stopped)
    assert into.state_count == stopped.state_count
    assert StateStore.open(tmp_path / "stopped").metadata["complete"] is False


def test_merge_refuses_what_would_leave_states_and_counts_apart(batches):
    keeping, counting_only = StateCaptureProbe("k"), StateCaptureProbe("c", keep_states=False)
    keeping.record(batches[0], 1)
    counting_only.record(batches[1], 1)
    for wrong in (None, 3, "probe"):
        with pytest.raises(OptionTypeError, match="merge\\(\\) takes a capture or a StateCounter"):
            keeping.merge(wrong)
    for without_states in (counting_only, counting_only.counter):
        with pytest.raises(OptionError, match="keeps its raw states, and what is merged into it has none"):
            keeping.merge(without_states)
    keeping.merge(StateCaptureProbe("empty"))  # nothing recorded: nothing to add
    keeping.merge(StateCounter(keeping.n_neurons))
    before = keeping.state_count
    counting_only.merge(keeping)  # counts alone: fine
    assert counting_only.state_count == before + batches[1].shape[0] * int(np.prod(batches[1].shape[2:]))


def test_many_threads_feed_one_capture():
    rng = np.random.default_rng(3)
    data = [rng.standard_normal((64, 16)).astype(np.float32) for _ in range(40)]
    capture = StateCaptureProbe("threads")
    threads = [threading.Thread(target=lambda b=b: capture.record(b, -1)) for b in data]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert capture.state_count == 40 * 64
    assert _as_dict(capture) == _reference(np.concatenate(data), -1)[1]


def test_attach_store_serves_states_recorded_elsewhere(tmp_path, batches):
    """A sharded run counts in one capture and stores raw states separately."""
    everything = np.concatenate(batches)
    packed, expected = _reference(everything, 1)
    store = StateStore(10, tmp_path / "conv")
    store.append(packed)
    store.flush()
    counted = StateCaptureProbe("conv", keep_states=False)
    for batch in batches:
        counted.record(batch, 1)
    counted.attach_store(StateStore.open(tmp_path / "conv"), instances=14, states_per_instance=12)
    np.testing.assert_array_equal(counted.states[:], packed)
    _, second = _reference(everything[3:4], 1)
    assert _as_dict(counted, [3]) == second
    assert _as_dict(counted) == expected  # the counts are untouched


def test_a_capture_holding_only_totals_computes_the_same_metrics_and_gathers_on_request():
    from tensorstate_onnx import NoStatesError, StateCaptureProbe
    from tensorstate_onnx.engine import StateCounter

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)).astype(np.float32)
    full = StateCaptureProbe("p", keep_states=False)
    full.record(x, 1)
    counter = full.counter
    hist = counter.count_histogram()

    summary = StateCaptureProbe("p", keep_states=False)
    summary.adopt_summary(12, counter.total, counter.n_distinct, hist)
    assert summary.state_count == full.state_count and summary.distinct_count == full.distinct_count
    for alpha in (0, 0.5, 1, 2, 3.5, float("inf")):
        assert summary.entropy(alpha) == full.entropy(alpha)
    assert summary.efficiency() == full.efficiency() and summary.efficiency(2, 1) == full.efficiency(2, 1)
    with pytest.raises(NoStatesError, match="only the totals"):
        summary.counts()

    gathered = []

    def gather():
        gathered.append(1)
        copy = StateCounter(12)
        copy.merge(counter)
        return copy

    lazy = StateCaptureProbe("p", keep_states=False)
    lazy.adopt_summary(12, counter.total, counter.n_distinct, hist, gather)
    assert lazy.entropy(2) == full.entropy(2) and not gathered
    assert sorted(lazy.counts()) == sorted(full.counts()) and gathered == [1]
    assert sorted(lazy.state_ids()) == sorted(full.state_ids()) and gathered == [1]
    lazy.record(x[:10], 1)  # more states go into the gathered counter
    assert lazy.state_count == full.state_count + 10
