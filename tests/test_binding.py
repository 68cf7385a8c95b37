"""IO-binding runner: the same outputs as ``session.run``, probe buffers reused in turn."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from tensorstate_onnx.binding import BoundRunner, uses_cuda
from tensorstate_onnx.graph import add_probes
from tensorstate_onnx import demo


@pytest.fixture(scope="module")
def probed():
    model, probes = add_probes(str(demo.model_path()), "Conv")
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = [spec.name for spec in session.get_outputs()]
    return session, outputs, {probe.output_name for probe in probes}


def test_outputs_equal_session_run_and_probe_buffers_rotate(probed):
    session, outputs, reused = probed
    x = demo.load_test_data()[0]
    runner = BoundRunner(session, outputs, reused)
    batches = [x[i : i + 50] for i in range(0, 200, 50)]
    probe = sorted(reused)[0]
    results = []
    for run, batch in enumerate(batches):
        got = runner.run({"input": batch})
        want = session.run(outputs, {"input": batch})
        for name, g, w in zip(outputs, got, want, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=name)
        results.append([g.copy() for g in got])
        if run >= 1:  # run 0 learns the shapes; then the two buffer sets take turns
            (buffer_sets, _), = runner._buffers.values()
            assert np.shares_memory(got[outputs.index(probe)], buffer_sets[(run - 1) % 2][probe])
    assert not np.array_equal(results[0][1], results[1][1])


def test_reused_arrays_are_overwritten_n_buffers_runs_later_and_outputs_never(probed):
    session, outputs, reused = probed
    x = demo.load_test_data()[0]
    runner = BoundRunner(session, outputs, reused, n_buffers=2)
    runner.run({"input": x[:40]})  # learns the shapes
    first = runner.run({"input": x[:40]})
    snapshot = [a.copy() for a in first]
    runner.run({"input": x[40:80]})
    runner.run({"input": x[80:120]})  # reuses the buffers of `first`
    logits = outputs.index(session.get_outputs()[0].name)
    np.testing.assert_array_equal(first[logits], snapshot[logits])  # the model output is the caller's
    changed = [name for name, a, b in zip(outputs, first, snapshot, strict=True) if name in reused and not np.array_equal(a, b)]
    assert changed == [name for name in outputs if name in reused]


def test_ragged_batches_get_their_own_buffers(probed):
    session, outputs, reused = probed
    x = demo.load_test_data()[0]
    runner = BoundRunner(session, outputs, reused)
    for size in (64, 64, 17, 64, 5, 1, 3, 2):
        got = runner.run({"input": x[:size]})
        want = session.run(outputs, {"input": x[:size]})
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)
    assert len(runner._buffers) == 4  # least recently used shapes are dropped


def test_bad_arguments():
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.INT64, [2])],
    )  # fmt: skip
    session = ort.InferenceSession(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    with pytest.raises(ValueError, match=r"outputs \['y'\] are not tensors of a type that can be bound"):
        BoundRunner(session, ["y"], {"y"})
    with pytest.raises(ValueError, match="n_buffers must be >= 1, got 0"):
        BoundRunner(session, ["y"], set(), n_buffers=0)
    assert not uses_cuda(session)
    assert BoundRunner(session, ["y"], set()).run({"x": np.array([3, -4])})[0].tolist() == [3, -4]
