"""Cross-framework parity: native capture (torch hooks, Keras layers) vs the ONNX path.

The same weights and inputs go through the framework's own front end and through
export + onnxruntime; every probed layer must record the same states. The only
differences allowed are states flipped by float rounding right at zero (the two
runtimes order floating-point operations differently), fewer than 1e-4 of all
states; the fraction is computed, printed and asserted.
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tensorstate_onnx import build_efficiency_model  # noqa: E402

MAX_FLIPPED = 1e-4

# LeNet-5 on 28x28 inputs: conv outputs are 24x24, 8x8 and 1x1 per image.
TUTORIAL_IMAGES = 10_000
TUTORIAL_STATES = [TUTORIAL_IMAGES * 24 * 24, TUTORIAL_IMAGES * 8 * 8, TUTORIAL_IMAGES]


def _flipped_states(a, b) -> int:
    """How many states captures ``a`` and ``b`` (same total) count differently.

    With the raw states kept on both sides they are compared row by row (both
    front ends order states batch first, then positions row-major); a state may
    then differ only in a bit or two (a neuron rounding to the other side of
    zero), never in a way that a wrong layout or channel axis would produce.
    """
    assert a.state_count == b.state_count, (a.name, a.state_count, b.state_count)
    assert a.n_neurons == b.n_neurons, (a.name, a.n_neurons, b.n_neurons)
    left = dict(zip(a.state_ids(), a.counts().tolist(), strict=True))
    right = dict(zip(b.state_ids(), b.counts().tolist(), strict=True))
    moved = sum(abs(left.get(key, 0) - right.get(key, 0)) for key in left.keys() | right.keys()) // 2
    if a.keep_states and b.keep_states:
        rows_a, rows_b = a.states[:], b.states[:]
        bits = np.unpackbits(rows_a ^ rows_b, axis=1).sum(axis=1)
        assert bits.max() <= 2, f"{a.name}: a state differs in {bits.max()} neurons"
        assert moved <= np.count_nonzero(bits)
        return int(np.count_nonzero(bits))
    return moved


def _assert_parity(pairs, what: str) -> float:
    """Compare (native, onnx) capture pairs; print, assert and return the flipped fraction."""
    total = sum(native.state_count for native, _ in pairs)
    flipped = {native.name: _flipped_states(native, onnx) for native, onnx in pairs}
    fraction = sum(flipped.values()) / total
    worst = max(flipped, key=lambda name: flipped[name])
    print(f"{what}: {len(pairs)} probes, {total} states, flipped fraction {fraction:.2e} "
          f"({sum(flipped.values())} states; most in {worst}: {flipped[worst]})")  # fmt: skip
    assert fraction < MAX_FLIPPED, f"{what}: {fraction:.2e} of the states differ"
    return fraction


# --------------------------------------------------------------------------- torch


def _torch_model(torch, arch: str):
    from models.torch_models import LeNet5, MobileNetV2Small, randomize_batchnorm

    torch.manual_seed(0)
    return randomize_batchnorm((LeNet5() if arch == "lenet5" else MobileNetV2Small()).eval())


# (input shape, {method: attach_to}, batch). One run per method.
_TORCH_CASES = {
    "lenet5": ((1, 28, 28), {"after": ["Conv2d", "Linear"], "before": ["Conv2d", "Linear"]}, 256),
    "mobilenet": (
        (3, 96, 96),
        {"after": ["Conv2d", "InvertedResidual", "ReLU6", "Linear"], "before": ["Conv2d", "Linear"]},
        24,
    ),
}


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("arch", ["lenet5", pytest.param("mobilenet", marks=pytest.mark.slow)])
def test_torch_hooks_match_onnx_path(torch, arch, dynamo):
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import attach_hooks, remove_state_layers

    shape, cases, n = _TORCH_CASES[arch]
    model = _torch_model(torch, arch)
    x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(7))
    exported = from_torch(model, torch.zeros(1, *shape), dynamo=dynamo)
    for method, attach_to in cases.items():
        onnx_model = OnnxEfficiencyModel(exported, attach_to, method=method, providers="cpu", keep_states=True)
        outputs = onnx_model.predict(x.numpy(), batch_size=n // 2)
        attach_hooks(model, attach_to, method=method)
        with torch.no_grad():
            expected = torch.cat([model(part) for part in x.split(n // 2)])
        np.testing.assert_allclose(outputs, expected.numpy(), atol=1e-4)
        hooks = {hook.name: hook for hook in model.efficiency_layers}
        probes = {capture.name: capture for capture in onnx_model.efficiency_layers}
        # Same layers selected, under the same names ("<module>:<method>").
        assert set(probes) == set(hooks)
        what = f"torch {arch} {'dynamo' if dynamo else 'legacy'} {method}"
        assert _assert_parity([(hooks[name], probes[name]) for name in hooks], what) < MAX_FLIPPED
    remove_state_layers(model)


def _sequence_model(torch, arch: str):
    """A small torch.nn sequence model, its input batch and the modules to probe."""
    from collections import OrderedDict

    nn = torch.nn
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(11)
    if arch == "linear":  # nn.Linear(8, 16) on (N, 5, 8): 16 neurons, N*5 states
        model = nn.Sequential(OrderedDict(fc=nn.Linear(8, 16), act=nn.ReLU(), out=nn.Linear(16, 3)))
        return model, torch.randn(24, 5, 8, generator=gen), ["fc", "act", "out"]
    if arch in ("lstm", "gru"):

        class Recurrent(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = (nn.LSTM if arch == "lstm" else nn.GRU)(5, 7, batch_first=True)
                self.fc = nn.Linear(7, 3)

            def forward(self, x):
                return self.fc(self.rnn(x)[0])

        return Recurrent(), torch.randn(24, 6, 5, generator=gen), ["rnn", "fc"]
    if arch == "transformer":
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        return layer, torch.randn(24, 5, 8, generator=gen), ["self_attn", "linear1", "linear2", "norm1", "norm2"]
    model = nn.Sequential(OrderedDict(emb=nn.Embedding(11, 6), fc=nn.Linear(6, 4)))
    return model, torch.randint(0, 11, (24, 5), generator=gen), ["emb", "fc"]


@pytest.mark.parametrize("arch", ["linear", pytest.param("lstm", marks=pytest.mark.slow), pytest.param("gru", marks=pytest.mark.slow), "transformer", "embedding"])
def test_torch_sequence_modules_match_onnx_path(torch, arch):
    """Dense and sequence modules on (N, L, D) tensors: the neurons are the features
    (last axis) on both paths, one state per token or time step."""
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import attach_hooks, remove_state_layers

    model, x, attach_to = _sequence_model(torch, arch)
    model.eval()
    exported = from_torch(model, x[:2])
    onnx_model = OnnxEfficiencyModel(exported, attach_to, providers="cpu", keep_states=True)
    outputs = onnx_model.predict(x.numpy(), batch_size=12)
    attach_hooks(model, attach_to)
    # Grad on: nn.TransformerEncoderLayer takes its fused fast path (no submodule
    # calls, so no hooks) under no_grad.
    expected = torch.cat([model(part) for part in x.split(12)]).detach()
    np.testing.assert_allclose(outputs, expected.numpy(), atol=1e-4)
    hooks = {hook.name: hook for hook in model.efficiency_layers}
    probes = {capture.name: capture for capture in onnx_model.efficiency_layers}
    assert set(probes) == set(hooks) == {f"{name}:after" for name in attach_to}
    tokens = x.shape[0] * x.shape[1]
    for name, hook in hooks.items():
        assert hook.channel_axis == probes[name].channel_axis == 2, name
        assert hook.state_count == probes[name].state_count == tokens, name
    assert _assert_parity([(hooks[name], probes[name]) for name in hooks], f"torch {arch}") < MAX_FLIPPED
    remove_state_layers(model)


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_root_module_and_framework_names_on_both_paths(torch, arch):
    """A bare nn.TransformerEncoderLayer is probed by its class on the ONNX path too
    (the root module is a scope), and "LSTM" names the module, not also the raw LSTM
    op output: the same probes, the same states."""
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import attach_hooks, remove_state_layers

    model, x, _ = _sequence_model(torch, arch)
    model.eval()
    attach_to = ["TransformerEncoderLayer", "norm1"] if arch == "transformer" else ["LSTM"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no guessed axis, no op type left out
        onnx_model = OnnxEfficiencyModel(from_torch(model, x[:2]), attach_to, method="both", providers="cpu",
                                         keep_states=True)  # fmt: skip
    onnx_model.predict(x.numpy(), batch_size=12)
    attach_hooks(model, attach_to, method="both")
    for part in x.split(12):
        model(part)
    hooks = {hook.name: hook for hook in model.efficiency_layers}
    probes = {capture.name: capture for capture in onnx_model.efficiency_layers}
    expected = (
        {"TransformerEncoderLayer:before", "TransformerEncoderLayer:after", "norm1:before", "norm1:after"}
        if arch == "transformer" else {"rnn:before", "rnn:after"}
    )  # fmt: skip
    assert set(probes) == set(hooks) == expected
    assert _assert_parity([(hooks[name], probes[name]) for name in hooks], f"torch {arch} root") < MAX_FLIPPED
    remove_state_layers(model)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_a_module_called_twice_records_every_call_on_both_paths(torch, dynamo):
    """torchvision's BasicBlock calls its one ReLU twice per forward: natively its hooks
    record both calls, and so does the ONNX probe (it watched only the last call)."""
    # The checkout's exporter (tensorstate_onnx.converters is this same package once
    # installed).
    from converters.torch_export import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import attach_hooks, remove_state_layers

    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
            self.conv2, self.bn2 = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
            self.relu = nn.ReLU()

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(out)) + x)

    from models.torch_models import randomize_batchnorm

    torch.manual_seed(0)
    model = randomize_batchnorm(BasicBlock().eval())
    x = torch.randn(10, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    onnx_model = OnnxEfficiencyModel(from_torch(model, x[:2], dynamo=dynamo), ["relu"], method="both",
                                     providers="cpu", keep_states=True)  # fmt: skip
    assert [(p.name, len(p.each_call())) for p in onnx_model.probes] == [("relu:before", 2), ("relu:after", 2)]
    onnx_model.predict(x.numpy(), batch_size=4)
    attach_hooks(model, ["relu"], method="both")
    with torch.no_grad():
        for part in x.split(4):
            model(part)
    pairs = list(zip(model.efficiency_layers, onnx_model.efficiency_layers, strict=True))
    assert [(a.name, a.state_count) for a, _ in pairs] == [(b.name, b.state_count) for _, b in pairs] == [
        ("relu:before", 2 * 10 * 36), ("relu:after", 2 * 10 * 36),
    ]  # fmt: skip
    assert _assert_parity(pairs, f"torch BasicBlock relu {'dynamo' if dynamo else 'legacy'}") < MAX_FLIPPED
    remove_state_layers(model)


def test_integer_inputs_are_refused_on_both_paths(torch):
    """method="before" on an Embedding reads int64 ids: the same typed error natively
    and on the ONNX path."""
    from tensorstate_onnx import ProbeDtypeError
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import attach_hooks, remove_state_layers

    model, x, _ = _sequence_model(torch, "embedding")
    with pytest.raises(ProbeDtypeError, match=r"'emb:before'.*int64.*float") as onnx_error:
        OnnxEfficiencyModel(from_torch(model, x[:2]), ["emb"], method="before", providers="cpu")
    attach_hooks(model, ["emb"], method="before")
    with pytest.raises(ProbeDtypeError, match=r"'emb:before'.*int64.*float") as native_error:
        model(x)
    assert str(onnx_error.value) == str(native_error.value)
    remove_state_layers(model)


# --------------------------------------------------------------------------- keras


def _keras_model(keras, arch: str):
    from models.keras_models import lenet5, mobilenet_v2_small, randomize_batchnorm

    keras.utils.set_random_seed(0)
    return randomize_batchnorm(lenet5() if arch == "lenet5" else mobilenet_v2_small())


_KERAS_CASES = {
    "lenet5": ((28, 28, 1), {"after": ["Conv2D", "Dense"], "before": ["Conv2D", "Dense"]}, 256),
    "mobilenet": (
        (96, 96, 3),
        {"after": ["Conv2D", "DepthwiseConv2D", "Add", "ReLU", "Dense"],
         "before": ["Conv2D", "DepthwiseConv2D", "Dense"]},
        24,
    ),
}


@pytest.mark.parametrize("arch", ["lenet5", pytest.param("mobilenet", marks=pytest.mark.slow)])
def test_keras_layers_match_onnx_path(keras, arch):
    from tensorstate_onnx.keras_capture import build_keras_efficiency_model

    shape, cases, n = _KERAS_CASES[arch]
    model = _keras_model(keras, arch)
    x = np.random.default_rng(7).normal(size=(n, *shape)).astype(np.float32)
    for method, attach_to in cases.items():
        native = build_keras_efficiency_model(model, attach_to, method=method)
        expected = native.predict(x, batch_size=n // 2, verbose=0)
        # Name the same layers: the Keras class "Add" is also an ONNX op type, which
        # would add the Add nodes of the BatchNormalization layers.
        names = sorted({capture.label for capture in native.efficiency_layers})
        onnx_model = build_efficiency_model(
            model, names, method=method, runtime="onnxruntime", providers="cpu", keep_states=True
        )
        outputs = onnx_model.predict(x, batch_size=n // 2)
        np.testing.assert_allclose(outputs, expected, atol=1e-4)
        probes = {(c.probe.label, c.probe.method): c for c in onnx_model.efficiency_layers}
        captures = {(c.label, c.method): c for c in native.efficiency_layers}
        assert set(probes) == set(captures)
        pairs = [(captures[key], probes[key]) for key in captures]
        assert _assert_parity(pairs, f"keras {arch} {method}") < MAX_FLIPPED


def test_keras_input_probe_needs_the_channels_last_axis(keras):
    """A probe on the NHWC model input itself ("before" the first layer): tf2onnx feeds
    it to a Reshape (1 channel), yet its neurons are on the last axis, as in Keras."""
    from tensorstate_onnx.converters import from_keras
    from tensorstate_onnx.keras_capture import build_keras_efficiency_model
    from tensorstate_onnx.runtime import OnnxEfficiencyModel

    model = _keras_model(keras, "lenet5")
    x = np.random.default_rng(8).normal(size=(64, 28, 28, 1)).astype(np.float32)
    native = build_keras_efficiency_model(model, ["conv1", "conv2"], method="before")
    native.predict(x, verbose=0)
    onnx_model = OnnxEfficiencyModel(
        from_keras(model), ["conv1", "conv2"], method="before", providers="cpu", keep_states=True
    )
    onnx_model.predict(x, batch_size=32)
    pairs = list(zip(native.efficiency_layers, onnx_model.efficiency_layers, strict=True))
    assert [c.name for c in onnx_model.efficiency_layers] == ["conv1:before", "conv2:before"]
    assert _assert_parity(pairs, "keras lenet5 before") < MAX_FLIPPED


# --------------------------------------------------------------------------- tutorial


@pytest.fixture(scope="module")
def tutorial_images():
    return np.random.default_rng(2024).random((TUTORIAL_IMAGES, 28, 28), dtype=np.float32)


@pytest.mark.slow
def test_tutorial_lenet5_torch_native_and_onnx(torch, tutorial_images):
    from tensorstate_onnx.torch_capture import attach_hooks

    model = _torch_model(torch, "lenet5")
    x = torch.from_numpy(tutorial_images[:, None])
    attach_hooks(model, ["Conv2d"], method="after", keep_states=False)
    with torch.no_grad():
        for batch in x.split(1000):
            model(batch)
    assert [h.state_count for h in model.efficiency_layers] == TUTORIAL_STATES
    onnx_model = build_efficiency_model(
        model, ["Conv2d"], method="after", runtime="onnxruntime",
        example_inputs=torch.zeros(1, 1, 28, 28), providers="cpu",
    )  # fmt: skip
    onnx_model.predict(x.numpy(), batch_size=1000)
    assert [c.state_count for c in onnx_model.efficiency_layers] == TUTORIAL_STATES
    assert [c.name for c in onnx_model.efficiency_layers] == ["conv1:after", "conv2:after", "conv3:after"]
    _assert_parity(list(zip(model.efficiency_layers, onnx_model.efficiency_layers, strict=True)), "tutorial torch")


@pytest.mark.slow
def test_tutorial_lenet5_keras_native_and_onnx(keras, tutorial_images):
    from tensorstate_onnx.keras_capture import build_keras_efficiency_model

    model = _keras_model(keras, "lenet5")
    x = tutorial_images[..., None]
    native = build_keras_efficiency_model(model, ["Conv2D"], method="after", keep_states=False)
    native.predict(x, batch_size=1000, verbose=0)
    assert [c.state_count for c in native.efficiency_layers] == TUTORIAL_STATES
    onnx_model = build_efficiency_model(model, ["Conv"], method="after", runtime="onnxruntime", providers="cpu")
    onnx_model.predict(x, batch_size=1000)
    assert [c.state_count for c in onnx_model.efficiency_layers] == TUTORIAL_STATES
    assert [c.probe.label for c in onnx_model.efficiency_layers] == ["conv1", "conv2", "conv3"]
    _assert_parity(list(zip(native.efficiency_layers, onnx_model.efficiency_layers, strict=True)), "tutorial keras")


class _SeqFirstEncoder:
    """Token ids ``[N, L]`` in, sequence first inside: an ``nn.LSTM`` and a
    ``TransformerEncoderLayer`` without ``batch_first`` and a LayerNorm after them
    see ``[L, N, D]`` tensors, as many pre-``batch_first`` models do."""

    @staticmethod
    def build(torch):
        nn = torch.nn

        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.emb, self.rnn = nn.Embedding(40, 8), nn.LSTM(8, 8)
                self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
                self.norm, self.out = nn.LayerNorm(8), nn.Linear(8, 3)

            def forward(self, input_ids, attention_mask):
                x = self.emb(input_ids) * attention_mask.unsqueeze(-1)
                x = self.rnn(x.transpose(0, 1))[0]
                return self.out(self.norm(self.encoder(x)).mean(0))

        torch.manual_seed(0)
        return Encoder().eval()


@pytest.mark.parametrize("pack_in_graph", [False, True], ids=["host", "in-graph"])
def test_sequence_first_tensors_give_each_sample_its_own_states_on_every_path(torch, pack_in_graph):
    """States are ordered batch first whichever axis holds the samples (DESIGN §1): the
    hooks, the ONNX path and in-graph packing give each sample its own states, in
    the order of the same tensors moved batch first by numpy, padding left out; the
    last batch is as long as the sequence and keeps its samples on axis 1."""
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import attach_hooks, remove_state_layers

    model = _SeqFirstEncoder.build(torch)
    n, length, batch = 17, 5, 6  # batches of 6, 6 and 5 samples
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 40, (n, length), generator=gen)
    mask = torch.ones(n, length, dtype=torch.int64)
    for row, real in ((1, 2), (4, 3), (9, 1), (16, 4)):
        mask[row, real:] = 0
    probed = ["rnn", "encoder.linear1", "norm"]
    seen = {name: [] for name in probed}
    plain = [model.get_submodule(name).register_forward_hook(
        lambda _m, _a, out, name=name: seen[name].append((out[0] if isinstance(out, tuple) else out).detach())
    ) for name in probed]  # fmt: skip
    with torch.no_grad():
        for part, part_mask in zip(ids.split(batch), mask.split(batch), strict=True):
            model(part, part_mask)
    for handle in plain:
        handle.remove()
    real = mask.bool().numpy()
    wanted = {}
    for name, parts in seen.items():
        assert [p.shape[:2] for p in parts] == [(length, 6), (length, 6), (length, 5)]
        samples = np.concatenate([np.moveaxis(p.numpy(), 1, 0) for p in parts])  # [N, L, D]
        wanted[f"{name}:after"] = (np.packbits(samples[real] > 0, axis=-1, bitorder="little"), samples, real)

    onnx_model = OnnxEfficiencyModel(
        from_torch(model, (ids[:2], mask[:2])), probed, providers="cpu", keep_states=True,
        mask_input="attention_mask", pack_in_graph=pack_in_graph,
    )  # fmt: skip
    onnx_model.predict({"input_ids": ids.numpy(), "attention_mask": mask.numpy()}, batch_size=batch)
    attach_hooks(model, probed, mask_input="attention_mask")
    with torch.no_grad():
        for part, part_mask in zip(ids.split(batch), mask.split(batch), strict=True):
            model(part, attention_mask=part_mask)
    hooks = {hook.name: hook for hook in model.efficiency_layers}
    probes = {capture.name: capture for capture in onnx_model.efficiency_layers}
    for name, (rows, samples, real_positions) in wanted.items():
        np.testing.assert_array_equal(hooks[name].states[:], rows, err_msg=name)
        for capture in (hooks[name], probes[name]):
            assert capture.state_count == real_positions.sum(), name
            for index in (0, 4, 9, 15, 16):  # 16: the last batch, 5 samples of 5 positions
                own = np.packbits(samples[index][real_positions[index]] > 0, axis=-1, bitorder="little")
                ids_, counts = np.unique(own, axis=0, return_counts=True)
                expected = dict(zip((r.tobytes() for r in ids_), counts.tolist(), strict=True))
                got = dict(zip(capture.state_ids([index]), capture.counts([index]).tolist(), strict=True))
                assert got == expected, (name, index)
    pairs = [(hooks[name], probes[name]) for name in wanted]
    assert _assert_parity(pairs, f"sequence-first, pack_in_graph={pack_in_graph}") < MAX_FLIPPED
    remove_state_layers(model)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_exclude_names_a_module_not_the_modules_inside_it_on_both_paths(torch, dynamo):
    """``exclude=["block"]`` drops the module ``block`` only (TensorState: "layers to not
    attach to"), natively and on the exported graph: its LayerNorm stays probed."""
    from collections import OrderedDict

    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import attach_hooks, remove_state_layers

    nn = torch.nn
    torch.manual_seed(0)
    block = nn.Sequential(OrderedDict(fc=nn.Linear(6, 8), norm=nn.LayerNorm(8)))
    model = nn.Sequential(OrderedDict(block=block, norm=nn.LayerNorm(8), out=nn.Linear(8, 2))).eval()
    x = torch.randn(4, 6)
    attach_to, exclude = ["block", "LayerNorm", "out"], ["block", "out"]
    onnx_model = OnnxEfficiencyModel(from_torch(model, x, dynamo=dynamo), attach_to, exclude, providers="cpu")
    attach_hooks(model, attach_to, exclude)
    expected = ["block.norm:after", "norm:after"]
    assert [hook.name for hook in model.efficiency_layers] == expected
    assert [probe.name for probe in onnx_model.probes] == expected
    remove_state_layers(model)


def test_keras_layers_named_like_another_layers_export_scope_match_onnx_path(keras):
    """Keras 3 export scopes layer ``conv`` as ``conv_1`` and layer ``conv_1`` as
    ``conv_1_2`` (auto-named layers of MobileNetV3 are named so): each ONNX probe is
    its own layer's, with the native neurons and states."""
    from tensorstate_onnx.keras_capture import build_keras_efficiency_model

    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3), name="img")
    x = keras.layers.Conv2D(4, 1, name="conv")(inputs)
    x = keras.layers.Conv2D(6, 1, name="conv_1")(x)
    x = keras.layers.Conv2D(5, 1, name="conv_2")(keras.layers.ReLU(name="re_lu")(x))
    model = keras.Model(inputs, x)
    data = np.random.default_rng(8).normal(size=(8, 6, 6, 3)).astype(np.float32)
    native = build_keras_efficiency_model(model, ["Conv2D"], method="both")
    native.predict(data, batch_size=4, verbose=0)
    onnx_model = build_efficiency_model(
        model, ["Conv2D"], method="both", runtime="onnxruntime", providers="cpu", keep_states=True
    )
    onnx_model.predict(data, batch_size=4)
    probes = {(c.probe.label, c.probe.method): c for c in onnx_model.efficiency_layers}
    captures = {(c.label, c.method): c for c in native.efficiency_layers}
    assert sorted(probes) == sorted(captures) == sorted(
        (name, method) for name in ("conv", "conv_1", "conv_2") for method in ("before", "after")
    )
    assert {key: c.n_neurons for key, c in probes.items()} == {key: c.n_neurons for key, c in captures.items()}
    assert probes[("conv_1", "before")].n_neurons == 4
    assert _assert_parity([(captures[key], probes[key]) for key in captures], "keras conv/conv_1") < MAX_FLIPPED


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_a_module_building_a_mask_in_its_forward_is_one_call_on_both_paths(torch, dynamo):
    """Swin builds its shifted-window mask by slice assignment in its forward; the legacy
    exporter leaves those Shape -> ConstantOfShape -> ScatterND nodes without a module
    scope. They belong to the module around them: each module is one call, as natively."""
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import attach_hooks, remove_state_layers

    nn = torch.nn

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            mask = y.new_zeros((y.shape[1], y.shape[1]))
            mask[: y.shape[1] // 2, :] = 1.0
            mask[:, : y.shape[1] // 2] = 2.0
            return y + mask @ y

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Sequential(Masked(), Masked()), nn.Linear(4, 2)).eval()
    x = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(5))
    attach_to = ["Sequential", "Masked"]
    onnx_model = OnnxEfficiencyModel(from_torch(model, x[:2], dynamo=dynamo), attach_to, method="both",
                                     providers="cpu", keep_states=True)  # fmt: skip
    assert all(len(probe.each_call()) == 1 for probe in onnx_model.probes)
    onnx_model.predict(x.numpy(), batch_size=3)
    attach_hooks(model, attach_to, method="both")
    with torch.no_grad():
        for part in x.split(3):
            model(part)
    hooks = {hook.name: hook for hook in model.efficiency_layers}
    probes = {capture.name: capture for capture in onnx_model.efficiency_layers}
    assert sorted(hooks) == sorted(probes) and len(hooks) == 8
    assert all(hook.state_count == 30 for hook in hooks.values())
    assert _assert_parity([(hooks[name], probes[name]) for name in hooks], "mask in forward") < MAX_FLIPPED
    remove_state_layers(model)


def test_a_layer_norm_subclass_with_its_own_forward_is_laid_out_by_its_readers(torch):
    """torchvision's ``LayerNorm2d`` (ConvNeXt) extends ``nn.LayerNorm`` with a forward
    that normalizes ``[N, C, H, W]`` through permutes: its neurons are the channels the
    next Conv reads, natively as on the ONNX path (not the last axis of a dense layer)."""
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import attach_hooks, remove_state_layers

    nn, functional = torch.nn, torch.nn.functional

    class LayerNorm2d(nn.LayerNorm):
        def forward(self, x):
            x = functional.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
            return x.permute(0, 3, 1, 2)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), LayerNorm2d(8), nn.Conv2d(8, 2, 1)).eval()
    x = torch.randn(6, 3, 4, 5, generator=torch.Generator().manual_seed(6))
    onnx_model = OnnxEfficiencyModel(from_torch(model, x[:2]), ["LayerNorm2d"], providers="cpu", keep_states=True)
    onnx_model.predict(x.numpy(), batch_size=3)
    attach_hooks(model, ["LayerNorm2d"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            model(x)
    (hook,), (probe,) = model.efficiency_layers, onnx_model.efficiency_layers
    assert (hook.channel_axis, hook.n_neurons, hook.state_count) == (probe.channel_axis, probe.n_neurons, probe.state_count) == (1, 8, 120)
    assert _assert_parity([(hook, probe)], "LayerNorm2d") < MAX_FLIPPED
    remove_state_layers(model)
