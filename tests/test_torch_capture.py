"""Tests of the PyTorch front end: StateCaptureHook, attach_hooks, remove_state_layers."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tensorstate_onnx import (  # noqa: E402
    ChannelAxisError,
    GuessedAxisWarning,
    NoStatesError,
    ProbeDtypeError,
    ProbeMatchError,
    StorageExistsError,
    build_efficiency_model,
    network_efficiency,
    reset_efficiency_model,
)
from tensorstate_onnx.engine import pack  # noqa: E402
from tensorstate_onnx.errors import OptionError, OptionTypeError  # noqa: E402
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


def test_overwrite_with_fewer_probes_deletes_the_earlier_stores_once_a_probe_writes(fresh_lenet, images, tmp_path):
    root = tmp_path / "states"
    attach_hooks(fresh_lenet, ["Conv2d"], storage_path=root)
    with torch.no_grad():
        fresh_lenet(images)
    for hook in fresh_lenet.efficiency_layers:
        hook.flush()
    (root / "notes.txt").write_text("mine")
    assert sorted(p.name for p in root.iterdir()) == ["conv1_after", "conv2_after", "conv3_after", "notes.txt"]
    with pytest.raises(StorageExistsError, match=r"is not empty; .*overwrite=True"):
        attach_hooks(fresh_lenet, ["conv2"], storage_path=root)
    assert len(fresh_lenet.efficiency_layers) == 3  # a refused call leaves the earlier hooks on

    attach_hooks(fresh_lenet, ["conv2"], storage_path=root, overwrite=True)
    assert len(list(root.iterdir())) == 4  # nothing deleted before a probe writes
    with torch.no_grad():
        fresh_lenet(images[:5])
    fresh_lenet.efficiency_layers[0].flush()
    assert sorted(p.name for p in root.iterdir()) == ["conv2_after", "notes.txt"]
    assert (root / "notes.txt").read_text() == "mine"
    assert len(StateStore.open(root / "conv2_after").read()) == 5 * 64  # replaced, not appended to


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


@pytest.mark.slow
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


def test_batches_laid_out_as_before_record_like_the_first(fresh_lenet, images):
    """From the second batch of a layout on, a hook skips the axis rules; its
    states must stay those of the reference, across changes of batch size and back."""
    attach_hooks(fresh_lenet, ["Conv2d"], method="both")
    batches = [images[:8], images[8:16], images[16:19], images[19:27], images[27:]]
    with torch.no_grad():
        for batch in batches:
            fresh_lenet(batch)
    names = ["conv1", "conv2", "conv3"]
    for before in (True, False):
        expected = _outputs_of(fresh_lenet, names, images, before=before)
        for name in names:
            hook = next(h for h in fresh_lenet.efficiency_layers if h.name == f"{name}:{'before' if before else 'after'}")
            assert hook.state_count == expected[name].shape[0] * np.prod(expected[name].shape[2:])
            assert _pairs(hook) == _reference(expected[name], 1), hook.name


def test_a_changed_channel_axis_applies_to_the_next_batch_of_the_same_layout():
    conv = torch.nn.Conv2d(3, 4, 1)
    hook = StateCaptureHook("conv", channel_axis=1)
    conv.register_forward_hook(hook)
    x = torch.randn(2, 3, 6, 6)
    conv(x)
    conv(x)
    assert hook.n_neurons == 4 and hook.state_count == 2 * 2 * 36
    hook.axis_override = 2
    with pytest.raises(OptionError, match="recorded 4 neurons before and now got 6"):
        conv(x)


def test_one_hook_on_two_modules_follows_each_module():
    """A hook registered by hand on a conv and on an elementwise module of the same
    output shape: the conv fixes axis 1, the elementwise module's tensor is guessed
    (last axis), whichever came first with that shape."""
    conv, act = torch.nn.Conv2d(3, 5, 1), torch.nn.ReLU()
    hook = StateCaptureHook("shared")
    conv.register_forward_hook(hook)
    act.register_forward_hook(hook)
    x = torch.randn(2, 3, 5, 7)
    with torch.no_grad():
        conv(x)
        conv(x)
        with pytest.warns(GuessedAxisWarning), pytest.raises(OptionError, match="recorded 5 neurons before and now got 7"):
            act(conv(x))


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


# --------------------------------------------------------------------------- neuron axes


def _numpy_counts(x: np.ndarray, axis: int):
    """An independent count: ``x > 0`` moved channels-last, bit-packed, unique rows."""
    x = np.asarray(x)
    if x.ndim == 1:
        x, axis = x[:, None], 1
    last = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
    rows, counts = np.unique(np.packbits(last > 0, axis=-1, bitorder="little"), axis=0, return_counts=True)
    return sorted(zip((row.tobytes() for row in rows), counts.tolist(), strict=True))


def _run_collecting(model, x, names, before=False):
    """Run ``model`` on ``x`` with grad on; return what the named submodules saw, by name."""
    seen = {}
    handles = []
    for name in names:
        sub = model.get_submodule(name)
        if before:
            handles.append(sub.register_forward_pre_hook(
                lambda m, a, n=name: seen.setdefault(n, []).append(a[0].detach().clone())))
        else:
            handles.append(sub.register_forward_hook(
                lambda m, a, o, n=name: seen.setdefault(n, []).append(_first(o).detach().clone())))
    captures = getattr(model, "efficiency_layers", [])
    for capture in captures:
        capture.capture_on = False
    try:
        model(x)
    finally:
        for handle in handles:
            handle.remove()
        for capture in captures:
            capture.capture_on = True
    return {n: torch.cat(v).numpy() for n, v in seen.items()}


def _first(value):
    return value if isinstance(value, torch.Tensor) else _first(value[0])


def test_linear_on_a_sequence_has_its_neurons_last():
    """nn.Linear(8, 16) on (2, 5, 8): 16 neurons, one state per token (was 5 / 32)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 16)
    attach_hooks(linear, ["Linear"], method="both")
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        y = linear(x)
    before, after = linear.efficiency_layers
    assert (before.n_neurons, before.state_count, before.channel_axis) == (8, 10, 2)
    assert (after.n_neurons, after.state_count, after.channel_axis) == (16, 10, 2)
    assert after.states_per_instance == 5
    assert _pairs(after) == _numpy_counts(y.numpy(), 2)
    assert _pairs(before) == _numpy_counts(x.numpy(), 2)
    remove_state_layers(linear)


class _Mixed(torch.nn.Module):
    """Conv1d -> GELU -> (transpose) -> LayerNorm -> Linear -> Dropout, a residual ReLU,
    a Flatten and a squeezed head: one of each way a module's axis is decided."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv1d(4, 6, 3)
        self.act = torch.nn.GELU()
        self.norm = torch.nn.LayerNorm(6)
        self.fc = torch.nn.Linear(6, 5)
        self.drop = torch.nn.Dropout(0.5)
        self.relu = torch.nn.ReLU()
        self.flat = torch.nn.Flatten()
        self.head = torch.nn.Linear(35, 1)
        self.out = torch.nn.Tanh()

    def forward(self, x):
        y = self.act(self.conv(x))  # (N, 6, 7): channels on axis 1
        z = self.drop(self.fc(self.norm(y.transpose(1, 2))))  # (N, 7, 5): features last
        z = self.relu(z + z.flip(1))  # a residual sum read by a module: the same layout
        score = self.head(self.flat(z)).squeeze(-1)  # (N,): one neuron per sample
        return self.out(score)


def test_each_module_kind_gets_the_axis_of_the_rule():
    torch.manual_seed(1)
    model = _Mixed().eval()
    names = ["conv", "act", "norm", "fc", "drop", "relu", "flat", "head", "out"]
    attach_hooks(model, names, method="both")
    x = torch.randn(6, 4, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is guessed
        model(x)
    hooks = {h.name: h for h in model.efficiency_layers}
    axes = {name: hooks[name].channel_axis for name in hooks}
    assert axes == {
        "conv:before": 1, "conv:after": 1, "act:before": 1, "act:after": 1,
        "norm:before": 2, "norm:after": 2, "fc:before": 2, "fc:after": 2,
        "drop:before": 2, "drop:after": 2, "relu:before": 2, "relu:after": 2,
        "flat:before": 2, "flat:after": 1, "head:before": 1, "head:after": 1,
        "out:before": 1, "out:after": 1,
    }  # fmt: skip
    assert hooks["out:after"].n_neurons == 1 and hooks["out:after"].state_count == 6
    after = _run_collecting(model, x, names)
    before = _run_collecting(model, x, names, before=True)
    for name in names:
        for method, seen in (("after", after), ("before", before)):
            hook = hooks[f"{name}:{method}"]
            assert _pairs(hook) == _numpy_counts(seen[name], hook.channel_axis), hook.name
    remove_state_layers(model)


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
def test_recurrent_outputs_are_the_sequence_features(cell):
    torch.manual_seed(2)
    rnn = getattr(torch.nn, cell)(5, 7, batch_first=True)
    model = torch.nn.Sequential()
    model.add_module("rnn", rnn)
    attach_hooks(model, ["rnn"])
    x = torch.randn(3, 4, 5)
    with torch.no_grad():
        output = rnn(x)[0]
        reset_efficiency_model(model)
        model(x)
    hook = model.efficiency_layers[0]
    assert (hook.n_neurons, hook.state_count, hook.channel_axis) == (7, 12, 2)
    assert _pairs(hook) == _numpy_counts(output.numpy(), 2)
    remove_state_layers(model)


def test_rank_one_outputs_are_one_neuron_per_sample():
    """Counts of a (N,) tensor do not depend on the batch size; an uneven last batch works."""
    torch.manual_seed(3)
    model = _Mixed().eval()
    x = torch.randn(7, 4, 9)
    results = []
    for sizes in ([7], [3, 3, 1], [2, 5]):
        attach_hooks(model, ["out"])
        with torch.no_grad():
            for part in x.split(sizes):
                model(part)
        hook = model.efficiency_layers[0]
        results.append((hook.n_neurons, hook.state_count, _pairs(hook)))
    assert results[0][:2] == (1, 7)
    assert results[0] == results[1] == results[2]
    with torch.no_grad():
        expected = model(x).numpy()
    assert results[0][2] == _numpy_counts(expected, 0)
    remove_state_layers(model)


def test_a_module_input_read_by_a_conv_is_channels_first():
    """The root's input has no producer; the Conv2d that reads it decides (axis 1)."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Conv2d(3, 4, 3))
    attach_hooks(model, ["Sequential", "0"], method="before")
    x = torch.randn(2, 3, 5, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)
    assert [(h.name, h.channel_axis, h.n_neurons, h.state_count) for h in model.efficiency_layers] == [
        ("Sequential:before", 1, 3, 60), ("0:before", 1, 3, 60),
    ]  # fmt: skip
    assert _pairs(model.efficiency_layers[0]) == _numpy_counts(x.numpy(), 1)
    remove_state_layers(model)


class _Reshaper(torch.nn.Module):
    def forward(self, x):
        return x.reshape(x.shape[0], 4, -1)


def test_a_guessed_axis_warns_and_names_the_override():
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), _Reshaper(), torch.nn.ReLU())
    attach_hooks(model, ["2"])
    x = torch.randn(5, 3)
    with pytest.warns(GuessedAxisWarning, match=r"channel_axes=\{'2:after': <axis>\}"):
        model(x)
    hook = model.efficiency_layers[0]
    assert (hook.channel_axis, hook.n_neurons, hook.state_count, hook.axis_guessed) == (2, 2, 20, True)
    attach_hooks(model, ["2"], channel_axes={"2:after": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            y = model(x)
    hook = model.efficiency_layers[0]
    assert (hook.channel_axis, hook.n_neurons, hook.state_count, hook.axis_guessed) == (1, 4, 10, False)
    assert _pairs(hook) == _numpy_counts(y.numpy(), 1)
    remove_state_layers(model)


def test_channel_axes_override_keys_and_ranges():
    torch.manual_seed(6)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    x = torch.randn(2, 3, 5, 5)
    attach_hooks(model, ["Conv2d", "ReLU"], method="both", channel_axes={"0": -1, "1:after": 2})
    with torch.no_grad():
        model(x)
    assert [(h.name, h.channel_axis, h.n_neurons) for h in model.efficiency_layers] == [
        ("0:before", 3, 5), ("0:after", 3, 3), ("1:before", 1, 4), ("1:after", 2, 3),
    ]  # fmt: skip
    with pytest.raises(ChannelAxisError, match=r"name no probe.*0:after") as info:
        attach_hooks(model, ["Conv2d"], channel_axes={"conv1": 1})
    assert isinstance(info.value, ValueError)
    with pytest.raises(OptionTypeError, match="int"):
        attach_hooks(model, ["Conv2d"], channel_axes={"0:after": "1"})
    attach_hooks(model, ["Conv2d"], channel_axes={"0:after": 4})
    with pytest.raises(ChannelAxisError, match=r"-4 to 3"):
        model(x)
    remove_state_layers(model)


def test_integer_tensors_are_refused():
    """An Embedding reads int64 ids: its 'before' probe is refused, its output recorded."""
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.Linear(6, 4))
    ids = torch.randint(0, 11, (3, 5))
    attach_hooks(model, ["0"], method="before")
    with pytest.raises(ProbeDtypeError, match=r"'0:before'.*int64.*float"):
        model(ids)
    attach_hooks(model, ["0"])
    with torch.no_grad():
        model(ids)
    hook = model.efficiency_layers[0]
    assert (hook.n_neurons, hook.state_count, hook.channel_axis) == (6, 15, 2)
    hook = StateCaptureHook("mask")
    with pytest.raises(ProbeDtypeError, match="bool"):
        hook.record_tensor(torch.ones(2, 3, dtype=torch.bool))
    remove_state_layers(model)


class Permute(torch.nn.Module):
    """Like torchvision.ops.misc.Permute (ConvNeXt's NCHW <-> NHWC)."""

    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


def test_permute_modules_carry_the_axis():
    torch.manual_seed(8)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 1), Permute([0, 2, 3, 1]), torch.nn.LayerNorm(6), torch.nn.GELU(),
        Permute([0, 3, 1, 2]), torch.nn.Identity(),
    )  # fmt: skip
    attach_hooks(model, ["1", "3", "4", "5"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(torch.randn(2, 3, 4, 5))
    assert [(h.name, h.channel_axis, h.n_neurons) for h in model.efficiency_layers] == [
        ("1:after", 3, 6), ("3:after", 3, 6), ("4:after", 1, 6), ("5:after", 1, 6),
    ]  # fmt: skip
    remove_state_layers(model)


class _ConvThenDense(torch.nn.Module):
    """Conv1d -> transpose(1, 2) as a plain torch call -> Linear over the channels."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv, self.fc = torch.nn.Conv1d(4, channels, 1), torch.nn.Linear(channels, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x).transpose(1, 2)))


@pytest.mark.parametrize("length", [9, 8])
def test_a_transpose_of_equal_sized_dimensions_does_not_carry_the_axis(length):
    # With 8 channels at 8 positions the transposed tensor has the conv output's shape;
    # its strides show the transpose, and the Linear that reads it decides: the last axis.
    torch.manual_seed(0)
    model = _ConvThenDense(8)
    attach_hooks(model, ["fc"], method="before")
    x = torch.randn(5, 4, length)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(x)
        hook = model.efficiency_layers[0]
    assert (hook.channel_axis, hook.n_neurons) == (2, 8)
    read = torch.relu(model.conv(x).transpose(1, 2)).detach().numpy().reshape(-1, 8)
    expected = np.unique(np.packbits(read > 0, axis=1, bitorder="little"), axis=0, return_counts=True)[1]
    assert sorted(hook.counts().tolist()) == sorted(expected.tolist())
    remove_state_layers(model)


def test_an_elementwise_function_of_a_channels_last_conv_keeps_its_axis():
    class ConvRelu(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.out = torch.nn.Conv2d(3, 8, 1), torch.nn.Identity()

        def forward(self, x):
            return self.out(torch.relu(self.conv(x)))

    model = ConvRelu().to(memory_format=torch.channels_last)
    attach_hooks(model, ["out"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last))  # C == H == W
    assert model.efficiency_layers[0].channel_axis == 1
    remove_state_layers(model)


def test_build_efficiency_model_takes_channel_axes_natively():
    torch.manual_seed(9)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16))
    built = build_efficiency_model(model, ["Linear"], channel_axes={"0:after": 1})
    with torch.no_grad():
        y = model(torch.randn(2, 5, 8))
    hook = built.efficiency_layers[0]
    assert (hook.channel_axis, hook.n_neurons, hook.state_count) == (1, 5, 32)
    assert _pairs(hook) == _numpy_counts(y.numpy(), 1)
    with pytest.raises(ChannelAxisError):
        build_efficiency_model(model, ["Linear"], channel_axes={"Linear": 1})
    remove_state_layers(model)


def test_a_forward_pass_that_raises_midway_leaves_no_partial_batch(torch):
    nn = torch.nn

    class Flaky(nn.Module):
        fail = False

        def forward(self, x):
            if self.fail:
                raise RuntimeError("the data loader handed over a bad batch")
            return x

    torch.manual_seed(0)
    flaky = Flaky()
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), flaky, nn.Conv2d(4, 3, 3)).eval()
    attach_hooks(model, ["Conv2d"])
    gen = torch.Generator().manual_seed(3)
    good, bad, later = (torch.randn(2, 1, 8, 8, generator=gen) for _ in range(3))
    with torch.no_grad():
        model(good)
        flaky.fail = True
        with pytest.warns(RuntimeWarning, match=r"forward pass of Sequential raised.*1 probe\(s\) \(0:after\).*dropped"):
            with pytest.raises(RuntimeError, match="bad batch"):
                model(bad)
        flaky.fail = False
        model(later)
    first, second = model.efficiency_layers
    remove_state_layers(model)
    assert first.state_count == 2 * 2 * 6 * 6 and second.state_count == 2 * 2 * 4 * 4, "the failed batch is not counted"
    with torch.no_grad():
        wanted = torch.cat([model[0](good), model[0](later)]).numpy()
    assert _pairs(first) == _numpy_counts(wanted, 1)
    assert np.array_equal(first.states[:], pack(wanted, 1)), "nor kept"


def test_when_every_probed_module_fixes_its_axis_only_the_modules_leading_to_probes_are_tracked(torch):
    """Conv probes need no tensor followed: passes are opened and closed through
    the root and the modules that lead to a probe (each an extra hook call per
    module per batch), so the others carry no hook; a probed block called alone
    still records its pass whole. A probe whose axis depends on its tensor's
    maker (a ReLU) has every module followed."""
    nn = torch.nn
    torch.manual_seed(0)

    def model():
        return nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()

    def hooked(module):
        return bool(module._forward_hooks or module._forward_pre_hooks)

    convs = attach_hooks(model(), ["Conv2d"])
    assert [hooked(m) for m in (convs, convs[0], convs[0][0], convs[0][1], convs[1], convs[2])] == [True, True, True, False, False, False]
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        convs(x)
        convs[0](x)  # the block alone: a pass of its own
    (probe,) = convs.efficiency_layers
    remove_state_layers(convs)
    with torch.no_grad():
        wanted = torch.cat([convs[0][0](x), convs[0][0](x)]).numpy()
    assert probe.state_count == 2 * 2 * 6 * 6 and _pairs(probe) == _numpy_counts(wanted, 1)
    relus = attach_hooks(model(), ["ReLU"])
    assert all(hooked(m) for m in relus.modules())


def test_kept_states_are_the_packed_rows_of_every_pass_in_order(torch):
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 12, 3), nn.ReLU(), nn.Conv2d(12, 20, 3)).eval()
    attach_hooks(model, ["Conv2d"])
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randn(n, 3, 10, 10, generator=gen) for n in (4, 1, 7)]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    hooks = model.efficiency_layers
    remove_state_layers(model)
    with torch.no_grad():
        wanted = [torch.cat([model[:1](b) for b in batches]), torch.cat([model(b) for b in batches])]
    for hook, tensor in zip(hooks, wanted, strict=True):
        rows = pack(tensor.numpy(), 1)
        assert hook.state_count == len(rows) and np.array_equal(hook.states[:], rows)
        fifth = sorted(zip(hook.state_ids(index=[4]), hook.counts(index=[4]).tolist(), strict=True))
        assert fifth == _reference(tensor[4:5].numpy(), 1), "the first sample of the second pass"


@pytest.mark.parametrize("probed", [["Conv2d"], ["Conv2d", "ReLU"]], ids=["axes fixed", "tensors followed"])
def test_a_call_that_raises_inside_a_pass_that_goes_on_leaves_the_pass_whole(torch, probed):
    """A block that raises, caught by the model, leaves its call open on the
    tracker's stack: the pass still closes when the root returns, with what
    the probes recorded in it, and the next pass starts afresh."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu, self.fail = nn.Conv2d(1, 4, 3), nn.ReLU(), False

        def forward(self, x):
            y = self.conv(x)
            if self.fail:
                raise ValueError("a fallback the model catches")
            return self.relu(y)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            self.block.fail = True
            try:
                self.block(x)
            except ValueError:
                pass
            self.block.fail = False
            return self.block(x)

    torch.manual_seed(0)
    model = attach_hooks(Model().eval(), probed)
    x, later = torch.randn(2, 1, 6, 6), torch.randn(3, 1, 6, 6)
    with torch.no_grad():
        model(x)
        model(later)
    conv = model.efficiency_layers[0]
    remove_state_layers(model)
    with torch.no_grad():
        wanted = torch.cat([model.block.conv(b) for b in (x, x, later, later)]).numpy()
    assert conv.state_count == (2 + 2 + 3 + 3) * 4 * 4, "every call recorded in both passes is counted"
    assert _pairs(conv) == _numpy_counts(wanted, 1)


class _TokenMLP(torch.nn.Module):
    """Embedding -> Linear, on [batch, length, features] or with the positions flattened."""

    def __init__(self, flatten: bool):
        super().__init__()
        self.emb, self.mlp, self.flatten = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 8), flatten

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids)
        return self.mlp(h.reshape(-1, h.shape[-1]) if self.flatten else h)


def test_a_mask_applies_alike_to_positions_flattened_or_not():
    ids = torch.randint(0, 50, (4, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.tensor([[1] * 6, [1] * 3 + [0] * 3, [1] * 2 + [0] * 4, [1] * 6])  # 17 real positions of 24
    counts = []
    for flatten in (False, True):
        torch.manual_seed(0)
        model = _TokenMLP(flatten)
        attach_hooks(model, ["mlp"], mask_input="attention_mask")
        with torch.no_grad():
            out = model(ids, attention_mask=mask)
        capture = model.efficiency_layers[0]
        assert capture.state_count == 17
        real = out.reshape(-1, 8)[mask.reshape(-1).bool()].numpy()
        expected = np.unique(np.packbits(real > 0, axis=1, bitorder="little"), axis=0, return_counts=True)[1]
        assert sorted(capture.counts().tolist()) == sorted(expected.tolist())
        counts.append(sorted(capture.counts().tolist()))
    assert counts[0] == counts[1]


class _Tokens(torch.nn.Module):
    """[N, C, H, W] -> [N, C, H*W] in plain torch calls (no submodule to follow)."""

    def forward(self, x):
        n, c, h, w = x.shape
        return x.reshape(n, c, h * w)


class _ConvTokens(torch.nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv, self.tok = torch.nn.Conv2d(3, channels, 1), _Tokens()

    def forward(self, x):
        return self.tok(self.conv(x)).sum(-1)


def test_a_reshape_that_leaves_the_channels_whole_keeps_their_axis_as_on_the_onnx_path():
    torch.manual_seed(0)
    model = _ConvTokens(6).eval()
    attach_hooks(model, ["tok"])
    x = torch.randn(8, 3, 2, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(x)
    hook = model.efficiency_layers[0]
    assert (hook.channel_axis, hook.n_neurons, hook.state_count) == (1, 6, 8 * 10)
    tokens = model.conv(x).detach().numpy().reshape(8, 6, 10)
    rows = np.moveaxis(tokens > 0, 1, -1).reshape(-1, 6)
    expected = np.unique(np.packbits(rows, axis=1, bitorder="little"), axis=0, return_counts=True)[1]
    assert sorted(hook.counts().tolist()) == sorted(expected.tolist())
    remove_state_layers(model)


def test_a_reshape_whose_sizes_leave_the_channels_ambiguous_is_a_warned_guess():
    # 4 channels at 2 x 2 positions: [N, 4, 4] could hold the channels on either axis.
    model = _ConvTokens(4).eval()
    attach_hooks(model, ["tok"])
    with pytest.warns(GuessedAxisWarning, match="channel_axes"):
        with torch.no_grad():
            model(torch.randn(2, 3, 2, 2))
    remove_state_layers(model)
