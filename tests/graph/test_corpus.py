"""The rewriter on a corpus nobody here wrote: the models the onnx package ships
for its backend tests (model-zoo architectures in ``light/``, converted PyTorch
models and operators, simple graphs).

Every model plain onnxruntime runs is rewritten from its file (its larger weights
left there for onnxruntime to read) with every op type probed before and after; its outputs must stay bit-identical, and every probe must count what
numpy counts on the same tensor, fetched again from the probed session (an
unoptimized session computes some tensors in another order, so a value at zero
may round to the other side).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest

from tensorstate_onnx.errors import ProbeDtypeError, ProbeMatchError
from tensorstate_onnx.runtime import OnnxEfficiencyModel

DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16}


def _cases() -> list:
    cases = [pytest.param(path, id=f"light/{path.stem}") for path in sorted((DATA / "light").glob("*.onnx"))]
    for folder in ("pytorch-converted", "pytorch-operator", "simple"):
        for case in sorted((DATA / folder).iterdir()):
            if (case / "model.onnx").is_file() and (case / "test_data_set_0").is_dir():
                cases.append(pytest.param(case / "model.onnx", id=f"{folder}/{case.name}"))
    return cases


def _feed(path: Path, session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """The case's stored inputs, or (model-zoo graphs, which ship none) seeded random ones."""
    stored = sorted((path.parent / "test_data_set_0").glob("input_*.pb"), key=lambda p: int(p.stem.split("_")[1]))
    if path.parent.name != "light" and stored:
        arrays = [onnx.numpy_helper.to_array(onnx.load_tensor(str(p))) for p in stored]
        return {spec.name: array for spec, array in zip(session.get_inputs(), arrays, strict=True)}
    rng = np.random.default_rng(0)
    return {
        spec.name: rng.normal(size=[d if isinstance(d, int) else 1 for d in spec.shape]).astype(_ORT_TYPES[spec.type])
        for spec in session.get_inputs()
    }


def _session(model: onnx.ModelProto, level) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _numpy_counts(tensor: np.ndarray, axis: int) -> list[int]:
    """Occurrences of each state, by numpy alone: neurons on ``axis``, one state per other position."""
    if tensor.ndim == 1:
        rows = (tensor > 0).reshape(-1, 1)
    else:
        moved = np.moveaxis(tensor, axis, -1)
        rows = moved.reshape(-1, moved.shape[-1]) > 0
    packed = np.packbits(rows, axis=-1, bitorder="little")
    return sorted(np.unique(packed, axis=0, return_counts=True)[1].tolist()) if len(packed) else []


@pytest.mark.slow
@pytest.mark.parametrize("path", _cases())
def test_every_op_type_probed_keeps_outputs_and_counts_like_numpy(path):
    model = onnx.load(str(path))
    try:
        plain = _session(model, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        feed = _feed(path, plain)
        expected = plain.run(None, feed)
    except Exception as exc:  # the corpus holds models onnxruntime does not run; they are not ours to rewrite
        pytest.skip(f"plain onnxruntime does not run it: {str(exc).splitlines()[0][:120]}")
    op_types = sorted({node.op_type for node in model.graph.node})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # guessed axes warn; the counts are checked on the axis chosen
        try:
            probed = OnnxEfficiencyModel(path, op_types, method="both", providers="cpu", keep_states=False)
        except (ProbeMatchError, ProbeDtypeError) as exc:  # right only where no tensor is a float tensor
            assert not any(np.asarray(v).dtype.kind == "f" for v in [*feed.values(), *expected]), str(exc)
            return
        outputs = probed.run(feed)
    for got, want in zip(outputs, expected, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want, equal_nan=want.dtype.kind == "f"), "an output changed"
    names = [probe.output_name for probe in probed.probes]
    tensors = dict(zip(names, probed.session.run(names, feed), strict=True))
    assert probed.probes, "nothing was probed"
    for probe, capture in zip(probed.probes, probed.efficiency_layers, strict=True):
        want = _numpy_counts(tensors[probe.output_name], probe.channel_axis)
        got = sorted(capture.counts().tolist()) if capture.state_count else []
        assert got == want, (probe.name, probe.channel_axis, tensors[probe.output_name].shape)
