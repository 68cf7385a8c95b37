"""The reduction partitioned by a hash of the state: any number of partitions and fan-in give the
same metrics as one process; merges are pure and refuse pieces that do not fit together."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("distributed")

from tensorstate_onnx import ModelInputError, OptionError, demo  # noqa: E402
from tensorstate_onnx.distributed import analyze_sharded  # noqa: E402
from tensorstate_onnx.distributed.reduce import (  # noqa: E402
    _combine, _merge_pieces, _probe_counter, _settle, _split, _Summary, _summary_of, _totals,
)
from tensorstate_onnx.engine import StateCounter  # noqa: E402
from tensorstate_onnx.metrics import entropy, histogram_entropy  # noqa: E402


@pytest.mark.distributed
@pytest.mark.parametrize("partitions, fan_in", [(1, 2), (3, 2), (5, 8), (None, 3)])
def test_any_partitioning_gives_the_single_process_metrics_and_counts(
    client, digits, reference, probes, assert_same_counts, partitions, fan_in
):
    x, y = digits
    result = analyze_sharded(
        demo.model_path(), x, labels=y, client=client, shard_size=30, partitions=partitions,
        merge_fan_in=fan_in, **probes,
    )  # fmt: skip
    assert result.n_partitions == (partitions or 2) == result.stats["n_partitions"]
    assert len(result.stats["shard_seconds"]) == 12
    assert len(result.stats["partition_merge_cpu_seconds"]) == result.n_partitions
    assert len(result.stats["partition_settle_cpu_seconds"]) == result.n_partitions
    assert all(seconds > 0 for seconds in result.stats["partition_settle_cpu_seconds"])
    assert result.accuracy == reference[1]
    assert_same_counts(reference[0], result.model)


@pytest.mark.distributed
@pytest.mark.parametrize("partitions", [0, -2, 1.5, True])
def test_partitions_must_be_a_positive_int(client, digits, probes, partitions):
    with pytest.raises(OptionError, match="partitions must be a positive int"):
        analyze_sharded(demo.model_path(), digits[0], client=client, partitions=partitions, **probes)


@pytest.mark.distributed
def test_more_partitions_than_shards_times_probes_is_refused(client, digits):
    x, _ = digits
    # 4 shards x 1 probe
    with pytest.raises(OptionError, match=r"partitions=5 is more than this run can use: at most 4 .*4 x 1"):
        analyze_sharded(demo.model_path(), x, "Gemm", client=client, shard_size=90, partitions=5)
    with pytest.raises(OptionError, match="at most 4096"):
        analyze_sharded(demo.model_path(), x, "Gemm", client=client, shard_size=1, partitions=5000)


@pytest.mark.distributed
def test_mismatched_shapes_between_shards_of_a_dynamic_model(client):
    # The MobileNet has a fully convolutional trunk, but spatial sizes are fixed;
    # build a model with a dynamic spatial size to reach the cross-shard check.
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 1, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H2", "W2"])], initializer=[w],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)

    def shard(i):
        size = 8 if i == 2 else 10
        yield np.ones((3, 1, size, size), np.float32)

    with pytest.raises(ValueError, match=r"shard \d has samples of shape \(1, \d+, \d+\) but shard \d has") as info:
        analyze_sharded(proto, shard, "Conv", n_shards=4, client=client, partitions=1)
    assert "shard 2" in str(info.value) and "(1, 8, 8)" in str(info.value)


def _counter(rows, c=40):
    counter = StateCounter(c)
    counter.add(rows)
    return counter


def test_merges_never_modify_their_inputs_and_a_rerun_gives_the_same_piece(sorted_counts):
    rng = np.random.default_rng(0)
    a = _split([_counter(rng.integers(0, 256, (500, 5), dtype=np.uint8))], 0, ("p",), 3)
    b = _split([_counter(rng.integers(0, 256, (300, 5), dtype=np.uint8))], 1, ("p",), 3)
    before = [sorted_counts(piece.counters[0]) for piece in a + b]
    merged = _merge_pieces(1, 3, a[1], b[1])
    again = _merge_pieces(1, 3, a[1], b[1])  # what a retried merge task computes
    for piece, (ids, counts) in zip(a + b, before):
        got = sorted_counts(piece.counters[0])
        assert np.array_equal(got[0], ids) and np.array_equal(got[1], counts)
    assert merged.shards == [0, 1] and merged.partition == 1
    assert merged.counters[0].total == a[1].counters[0].total + b[1].counters[0].total == again.counters[0].total
    for x, y in zip(sorted_counts(merged.counters[0]), sorted_counts(again.counters[0])):
        assert np.array_equal(x, y)


def test_a_piece_sent_between_workers_arrives_whole_without_packed_rows(sorted_counts):
    """Pieces move between workers as Dask serializes them (pickle with
    out-of-band buffers): every probe's counts arrive, from a direct table, keys
    and long states, and no buffer holds the states as packed bytes (a merge of
    the arrived pieces needs no rehashing)."""
    from distributed.protocol import deserialize, serialize

    rng = np.random.default_rng(2)
    widths = (12, 40, 200)
    counters = [_counter(rng.integers(0, 256, (800, (c + 7) // 8), dtype=np.uint8) & _last_byte_mask(c), c) for c in widths]
    pieces = _split([*counters, None], 4, ("a", "b", "c", "d"), 2)
    for piece in pieces:
        header, frames = serialize(piece, serializers=("pickle",))
        arrived = deserialize(header, frames)
        assert (arrived.shards, arrived.partition, arrived.n_partitions) == ([4], piece.partition, 2)
        assert arrived.probe_names == piece.probe_names and arrived.counters[3] is None
        for sent, got in zip(piece.counters[:3], arrived.counters[:3]):
            if sent is None:  # the 12-neuron probe goes whole to one partition
                assert got is None
                continue
            assert got.total == sent.total and got.n_neurons == sent.n_neurons
            for x, y in zip(sorted_counts(got), sorted_counts(sent)):
                assert np.array_equal(x, y)
        packed_200 = piece.counters[2].n_distinct * 25  # bytes of its states as packed rows
        assert all(memoryview(frame).nbytes != packed_200 for frame in frames)
    merged = _merge_pieces(0, 2, deserialize(*serialize(pieces[0], serializers=("pickle",))), pieces[0])
    assert [c.total for c in merged.counters[:3]] == [2 * c.total for c in pieces[0].counters[:3]]
    assert merged.counters[0].total == 1600  # probe 0 (12 neurons) lives in partition 0


def test_a_counter_of_up_to_16_neurons_goes_whole_to_one_partition_in_every_shard():
    """Its table costs the same whatever it holds: it is not split, and merging
    its partition gives the counts of every shard."""
    rng = np.random.default_rng(4)
    shards = []
    for shard in range(3):
        rows = rng.integers(0, 256, (300, 2), dtype=np.uint8)
        shards.append((rows, _split([_counter(rows[:, :1], 8), _counter(rows, 16), _counter(rows[:, :1], 8)], shard, ("a", "b", "c"), 4)))
    for rows, pieces in shards:
        for probe, home in ((0, 0), (1, 1), (2, 2)):
            held = [j for j, piece in enumerate(pieces) if piece.counters[probe] is not None]
            assert held == [home] and pieces[home].counters[probe].total == 300
    merged = _merge_pieces(1, 4, *(pieces[1] for _, pieces in shards))
    rows = np.concatenate([rows for rows, _ in shards])
    ids, counts = np.unique(rows, axis=0, return_counts=True)
    got_ids, got_counts = merged.counters[1].result(sort=True)
    assert np.array_equal(got_ids, ids) and np.array_equal(got_counts, counts)


def _last_byte_mask(c):
    mask = np.full((c + 7) // 8, 255, np.uint8)
    if c % 8:
        mask[-1] = (1 << (c % 8)) - 1
    return mask


def _summary_from_results(piece) -> _Summary:
    """The reference for a settled partition's summary: each probe's totals from
    its merged counter's own result()."""
    probes = [None if c is None or c.total == 0 else _totals(c, *c.result()) for c in piece.counters]
    return _Summary(piece.partition, piece.shards, probes, piece.merge_cpu_seconds)


def test_a_settled_partition_keeps_its_counters_compact_and_gives_them_back_whole(sorted_counts):
    """What stays on the cluster: the summary of the merged partition and each
    counter's pickle, smaller than the counter it was, rebuilt exactly on request."""
    rng = np.random.default_rng(5)
    rows = [rng.integers(0, 256, (4000, n_bytes), dtype=np.uint8) for n_bytes in (2, 5, 25)]
    shards = [_split([_counter(r[s::2], 8 * r.shape[1]) for r in rows] + [None], s, ("a", "b", "c", "d"), 2) for s in range(2)]
    merged = _merge_pieces(1, 2, shards[0][1], shards[1][1])
    settled = _settle(merged)
    summary, expected = _summary_of(settled), _summary_from_results(merged)
    assert summary.partition == 1 and summary.shards == [0, 1]
    for got, want in zip(summary.probes, expected.probes):
        assert (got is None) == (want is None)
        if got is not None:
            assert (got.total, got.n_distinct) == (want.total, want.n_distinct)
            assert all(np.array_equal(x, y) for x, y in zip(got.histogram, want.histogram))
    assert settled.pickles[3] is None and _probe_counter(settled, 3) is None
    for probe, counter in enumerate(merged.counters[:3]):
        if counter is None:
            assert settled.pickles[probe] is None
            continue
        assert len(settled.pickles[probe]) < counter.nbytes / 2
        back = _probe_counter(settled, probe)
        assert back.total == counter.total
        assert all(np.array_equal(x, y) for x, y in zip(sorted_counts(back), sorted_counts(counter)))


def test_pieces_that_do_not_fit_together_are_refused():
    rows = np.random.default_rng(1).integers(0, 256, (100, 5), dtype=np.uint8)
    wide = _split([_counter(rows)], 0, ("p",), 2)
    narrow = _split([_counter(rows[:, :3], 24)], 1, ("p",), 2)
    with pytest.raises(ModelInputError, match=r"probe 'p' has states of 24 neurons in shards \[1\] but of 40 in shards \[0\]"):
        _merge_pieces(0, 2, wide[0], narrow[0])
    with pytest.raises(OptionError, match=r"the merge of partition 0 of 2 got partition 1 of 2 from shards \[1\]"):
        _merge_pieces(0, 2, wide[0], narrow[1])
    other = _split([_counter(rows)], 1, ("p",), 3)
    with pytest.raises(OptionError, match="got partition 0 of 3"):
        _merge_pieces(0, 2, wide[0], other[0])
    with pytest.raises(ModelInputError, match=r"probe 'p' has states of different numbers of neurons \(24 in partition 1, 40 in partition 0\)"):
        _combine([_summary_of(_settle(_merge_pieces(0, 2, wide[0]))), _summary_of(_settle(_merge_pieces(1, 2, narrow[1])))], ("p",))


def test_combined_histograms_give_the_entropies_of_the_whole_counts_exactly():
    rng = np.random.default_rng(2)
    pool = rng.integers(0, 256, (400, 9), dtype=np.uint8)
    shards = [pool[rng.zipf(1.4, 3000) % 400] for _ in range(4)]
    whole = StateCounter(72)
    for rows in shards:
        whole.add(rows)
    pieces = [_split([_counter(rows, 72), None], s, ("p", "q"), 5) for s, rows in enumerate(shards)]
    summaries = [_summary_of(_settle(_merge_pieces(j, 5, *[p[j] for p in pieces]))) for j in range(5)]
    totals, nothing = _combine(summaries, ("p", "q"))
    assert nothing is None
    assert totals.total == whole.total and totals.n_distinct == whole.n_distinct and totals.n_neurons == 72
    for alpha in (0, 0.5, 1, 2, 7.25, float("inf")):
        assert histogram_entropy(*totals.histogram, alpha) == entropy(whole.counts(), alpha)
