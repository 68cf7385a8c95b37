"""Partial results and the reduction tree: any tree shape gives the same counts; merges are pure."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("distributed")

from tensorstate_onnx import demo  # noqa: E402
from tensorstate_onnx.distributed import analyze_sharded  # noqa: E402
from tensorstate_onnx.distributed.reduce import _merge_partials, _Partial  # noqa: E402
from tensorstate_onnx.engine import StateCounter  # noqa: E402


@pytest.mark.distributed
@pytest.mark.parametrize("fan_in, roots", [(2, 1), (3, 1), (2, 2), (2, None), (4, 5)])
def test_reduction_tree_shapes_give_the_same_counts(client, digits, reference, probes, assert_same_counts, fan_in, roots):
    x, y = digits
    result = analyze_sharded(
        demo.model_path(), x, labels=y, client=client, shard_size=30, merge_fan_in=fan_in,
        merge_roots=roots, **probes,
    )  # fmt: skip
    assert_same_counts(reference[0], result.model)
    assert result.accuracy == reference[1]
    assert len(result.stats["shard_seconds"]) == 12
    merges = len(result.stats["merge_task_seconds"])
    # 12 shards; by default the client merges up to 32 partials itself.
    assert merges == {(2, 1): 11, (3, 1): 6, (2, 2): 10, (2, None): 0, (4, 5): 3}[(fan_in, roots)]


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
        analyze_sharded(proto, shard, "Conv", n_shards=4, client=client, merge_roots=1)
    assert "shard 2" in str(info.value) and "(1, 8, 8)" in str(info.value)


def test_merge_tasks_never_modify_their_inputs(sorted_counts):
    rng = np.random.default_rng(0)

    def partial(index, rows):
        counter = StateCounter(40)
        counter.add(rows)
        return _Partial([index], ("p",), [counter], len(rows), 0, 0, (1,), index, [0.0], [], 0.0)

    a = partial(0, rng.integers(0, 256, (500, 5), dtype=np.uint8))
    b = partial(1, rng.integers(0, 256, (300, 5), dtype=np.uint8))
    before = [sorted_counts(p.counters[0]) for p in (a, b)]
    merged = _merge_partials(a, b)
    again = _merge_partials(a, b)  # what a retried merge task would compute
    for p, (ids, counts) in zip((a, b), before):
        assert np.array_equal(sorted_counts(p.counters[0])[0], ids)
        assert np.array_equal(sorted_counts(p.counters[0])[1], counts)
    assert merged.counters[0].total == 800 == again.counters[0].total
    assert merged.shards == [0, 1]
