"""Tests of the PyTorch front end: StateCaptureHook, attach_hooks, remove_state_layers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tensorstate_onnx import (  # noqa: E402
    NoStatesError,
    ProbeMatchError,
    StorageExistsError,
    build_efficiency_model,
    network_efficiency,
    reset_efficiency_model,
)
from tensorstate_onnx.engine import pack  # noqa: E402
from models.torch_models import LeNet5, MobileNetV2Small  # noqa: E402
from tensorstate_onnx.store import StateStore  # noqa: E402
from tensorstate_onnx.torch_capture import (  # noqa: E402
    StateCaptureHook,
    attach_hooks,
    pack_tensor,
    remove_state_layers,
)


def _pairs(capture):
    return sorted(zip(capture.state_ids(), capture.counts().tolist(), strict=True))


def _reference(tensor: np.ndarray, axis: int):
    ids, counts = np.unique(pack(tensor, axis), axis=0, return_counts=True)
    return sorted(zip((row.tobytes() for row in ids), counts.tolist(), strict=True))


def _outputs_of(module, names, x, before=False):
    """The tensors entering/leaving the named submodules, from separate plain hooks."""
    seen = {}
    handles = []
    for name in names:
        sub = module.get_submodule(name)
        if before:
            handles.append(sub.register_forward_pre_hook(lambda m, a, n=name: seen.setdefault(n, []).append(a[0].detach().clone())))
        else:
            handles.append(sub.register_forward_hook(lambda m, a, o, n=name: seen.setdefault(n, []).append(o.detach().clone())))
    captures = getattr(module, "efficiency_layers", [])
    for capture in captures:
        capture.capture_on = False
    with torch.no_grad():
        module(x)
    for capture in captures:
        capture.capture_on = True
    for h in handles:
        h.remove()
    return {n: torch.cat(v).float().numpy() for n, v in seen.items()}


@pytest.fixture(scope="module")
def lenet():
    torch.manual_seed(0)
    return LeNet5().eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def fresh_lenet(lenet):
    yield lenet
    remove_state_layers(lenet)


def test_after_hooks_count_like_numpy_reference(fresh_lenet, images):
    attach_hooks(fresh_lenet, ["Conv2d"])
    names = [h.name for h in fresh_lenet.efficiency_layers]
    assert names == ["conv1:after", "conv2:after", "conv3:after"]
    with torch.no_grad():
        fresh_lenet(images[:25])
        fresh_lenet(images[25:])
    expected = _outputs_of(fresh_lenet, ["conv1", "conv2", "conv3"], images)
    for hook, module_name, per_instance in zip(fresh_lenet.efficiency_layers, ["conv1", "conv2", "conv3"], [576, 64, 1], strict=True):
        assert hook.state_count == 40 * per_instance
        assert hook.states_per_instance == per_instance
        assert hook.n_neurons == expected[module_name].shape[1]
        assert _pairs(hook) == _reference(expected[module_name], 1)
        assert hook.method == "after"
        assert hook.metadata["module"] == module_name


def test_before_and_both_record_inputs(fresh_lenet, images):
    attach_hooks(fresh_lenet, ["conv2", "dense"], method="both")
    names = [h.name for h in fresh_lenet.efficiency_layers]
    assert names == ["conv2:before", "conv2:after", "dense:before", "dense:after"]
    with torch.no_grad():
        fresh_lenet(images)
    before = _outputs_of(fresh_lenet, ["conv2", "dense"], images, before=True)
    after = _outputs_of(fresh_lenet, ["conv2", "dense"], images)
    hooks = {h.name: h for h in fresh_lenet.efficiency_layers}
    assert _pairs(hooks["conv2:before"]) == _reference(before["conv2"], 1)
    assert _pairs(hooks["conv2:after"]) == _reference(after["conv2"], 1)
    # Rank-2 tensors: neurons on the last axis, one state per instance.
    assert hooks["dense:before"].n_neurons == 100 and hooks["dense:before"].state_count == 40
    assert _pairs(hooks["dense:after"]) == _reference(after["dense"], -1)


def test_grad_no_grad_and_inference_mode_record_the_same(fresh_lenet, images):
    attach_hooks(fresh_lenet, ["Conv2d"], keep_states=False)
    fresh_lenet(images)  # autograd on: tensors require grad
    first = [_pairs(h) for h in fresh_lenet.efficiency_layers]
    for context in (torch.no_grad, torch.inference_mode):
        reset_efficiency_model(fresh_lenet)
        with context():
            fresh_lenet(images)
        assert [_pairs(h) for h in fresh_lenet.efficiency_layers] == first


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_and_high_precision(dtype, images):
    torch.manual_seed(3)
    model = LeNet5().eval().to(dtype)
    x = images.to(dtype)
    expected = _outputs_of(model, ["conv1", "conv3"], x)  # cast to float32: same signs
    attach_hooks(model, ["conv1", "conv3"])
    with torch.no_grad():
        model(x)
    hooks = model.efficiency_layers
    assert _pairs(hooks[0]) == _reference(expected["conv1"], 1)
    assert _pairs(hooks[1]) == _reference(expected["conv3"], 1)


def test_pack_tensor_matches_engine_pack():
    gen = torch.Generator().manual_seed(5)
    for shape, axis in [((5, 13, 3, 4), 1), ((7, 17), 1), ((3, 8, 2), 1), ((4, 3, 5, 6, 2), 1), ((6, 9), 0)]:
        t = torch.randn(shape, generator=gen)
        flat = t.view(-1)
        flat[:3] = float("nan")
        flat[3] = -0.0
        flat[4] = 0.0
        flat[5] = float("inf")
        flat[6] = float("-inf")
        for dtype in (torch.float32, torch.float16, torch.float64):
            assert np.array_equal(pack_tensor(t.to(dtype), axis), pack(t.to(dtype).numpy(), axis)), (shape, dtype)
        assert np.array_equal(pack_tensor(t.bfloat16(), axis), pack(t.bfloat16().float().numpy(), axis))
        assert np.array_equal(pack_tensor(t > 0, axis), pack((t > 0).numpy(), axis))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_packed_on_the_device(images):  # pragma: no cover - GPU only
    torch.manual_seed(0)
    cpu_model = LeNet5().eval()
    gpu_model = LeNet5().eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.cuda()
    attach_hooks(cpu_model, ["Conv2d"])
    attach_hooks(gpu_model, ["Conv2d"])
    with torch.no_grad():
        cpu_model(images)
        gpu_model(images.cuda())
    for a, b in zip(cpu_model.efficiency_layers, gpu_model.efficiency_layers, strict=True):
        assert a.state_count == b.state_count
        # States at exactly-zero rounding may flip between CPU and GPU kernels.
        diff = sum(abs(x - y) for (_, x), (_, y) in zip(_pairs(a), _pairs(b))) if _pairs(a) != _pairs(b) else 0
        assert diff <= 1e-3 * a.state_count


def test_matching_globs_classes_qualified_names_and_exclude():
    model = MobileNetV2Small().eval()
    attach_hooks(model, ["features.*.conv.2"], exclude=["features.7.*"])
    assert [h.name for h in model.efficiency_layers] == [f"features.{i}.conv.2:after" for i in range(1, 7)]
    attach_hooks(model, ["torch.nn.modules.conv.Conv2d"], exclude=["features.1*", "features.2*"])
    names = [h.metadata["module"] for h in model.efficiency_layers]
    assert len(names) == 22 - 2 - 3
    assert not any(n.startswith(("features.1.", "features.2.")) for n in names)
    # Module order, as named_modules() lists them.
    ordered = [n for n, m in model.named_modules() if n in set(names)]
    assert names == ordered
    remove_state_layers(model)


def test_no_match_lists_modules_and_classes(lenet):
    with pytest.raises(ProbeMatchError) as info:
        attach_hooks(lenet, ["Conv3d", "nothing*"])
    message = str(info.value)
    assert "Conv3d" in message and "conv1 (Conv2d)" in message and "BatchNorm2d" in message
    with pytest.raises(ProbeMatchError, match="excluded"):
        attach_hooks(lenet, ["Conv2d"], exclude=["conv*"])
    with pytest.raises(ProbeMatchError, match="empty"):
        attach_hooks(lenet, [])
    with pytest.raises(ValueError, match="method"):
        attach_hooks(lenet, ["Conv2d"], method="around")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        attach_hooks("not a module", ["Conv2d"])
    with pytest.raises(TypeError, match="strings"):
        attach_hooks(lenet, [3])
    assert not hasattr(lenet, "efficiency_layers")


def test_remove_and_reattach(fresh_lenet, images):
    attach_hooks(fresh_lenet, ["Conv2d"])
    first = fresh_lenet.efficiency_layers
    attach_hooks(fresh_lenet, ["conv1"])  # replaces the earlier hooks
    with torch.no_grad():
        fresh_lenet(images)
    assert [h.state_count for h in first] == [0, 0, 0]
    assert fresh_lenet.efficiency_layers[0].state_count == 40 * 576
    remove_state_layers(fresh_lenet)
    assert not hasattr(fresh_lenet, "efficiency_layers")
    assert not fresh_lenet.conv1._forward_hooks and not fresh_lenet.conv1._forward_pre_hooks
    remove_state_layers(fresh_lenet)  # idempotent


def test_storage_path_keep_states_and_existing_store(fresh_lenet, images, tmp_path):
    attach_hooks(fresh_lenet, ["Conv2d"], storage_path=tmp_path / "states")
    with torch.no_grad():
        fresh_lenet(images)
    hook = fresh_lenet.efficiency_layers[0]
    hook.flush()
    assert hook.disk_path == tmp_path / "states" / "conv1_after"
    reopened = StateStore.open(hook.disk_path)
    assert reopened.array.shape == (40 * 576, 3)
    assert np.array_equal(reopened.array[:], hook.states[:])
    with pytest.raises(StorageExistsError):
        attach_hooks(fresh_lenet, ["Conv2d"], storage_path=tmp_path / "states")
    attach_hooks(fresh_lenet, ["conv1"], keep_states=False)
    with torch.no_grad():
        fresh_lenet(images)
    assert fresh_lenet.efficiency_layers[0].state_count == 40 * 576
    with pytest.raises(NoStatesError, match="keep"):
        fresh_lenet.efficiency_layers[0].states


def test_build_efficiency_model_dispatches_to_hooks(fresh_lenet, images):
    model = build_efficiency_model(fresh_lenet, ["Conv2d"], method="after")
    assert model is fresh_lenet
    with torch.no_grad():
        model(images)
    efficiency = network_efficiency(model)
    assert 0 < efficiency <= 1
    reset_efficiency_model(model)
    assert [h.state_count for h in model.efficiency_layers] == [0, 0, 0]


def test_hooks_record_nothing_while_exporting_or_tracing(fresh_lenet):
    attach_hooks(fresh_lenet, ["Conv2d"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(fresh_lenet, torch.randn(2, 1, 28, 28), check_trace=False)
    assert [h.state_count for h in fresh_lenet.efficiency_layers] == [0, 0, 0]


def test_compiled_modules_record_and_strict_export_does_not(fresh_lenet, images):
    attach_hooks(fresh_lenet, ["Conv2d"])
    compiled = torch.compile(fresh_lenet, backend="eager")  # dynamo traces the hooks
    with torch.no_grad():
        compiled(images)
    assert [h.state_count for h in fresh_lenet.efficiency_layers] == [40 * 576, 40 * 64, 40]
    expected = _outputs_of(fresh_lenet, ["conv1"], images)["conv1"]
    assert _pairs(fresh_lenet.efficiency_layers[0]) == _reference(expected, 1)
    reset_efficiency_model(fresh_lenet)
    torch.export.export(fresh_lenet, (images[:2],), strict=True)
    torch.export.export(fresh_lenet, (images[:2],), strict=False)
    assert [h.state_count for h in fresh_lenet.efficiency_layers] == [0, 0, 0]


def test_standalone_hook_and_capture_switch():
    conv = torch.nn.Conv2d(3, 9, 3)
    hook = StateCaptureHook("conv", method="before")
    conv.register_forward_pre_hook(hook)
    x = torch.randn(2, 3, 5, 5)
    conv(x)
    assert hook.state_count == 2 * 25 and hook.n_neurons == 3
    hook.capture_on = False
    conv(x)
    assert hook.state_count == 50
    with pytest.raises(ValueError, match="method"):
        StateCaptureHook("x", method="both")


@pytest.mark.parametrize("not_a_module", [5, None, "lenet"])
def test_remove_state_layers_refuses_what_is_not_a_module(not_a_module):
    with pytest.raises(TypeError, match=f"remove_state_layers takes a torch.nn.Module, not {type(not_a_module).__name__}"):
        remove_state_layers(not_a_module)
