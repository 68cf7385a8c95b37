"""Parity on real architectures nobody here wrote: torchvision and keras.applications
models with random weights, at small input sizes.

Each model runs through its framework's native front end and through export +
onnxruntime; both must select the same probes under the same names, count the
same states per probe, and differ only by neurons flipped by float rounding at
zero.
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tensorstate_onnx import build_efficiency_model  # noqa: E402

# A state flips when any of its neurons rounds to the other side of zero; with the
# hundreds of neurons of ConvNeXt's and ViT's Linear layers one flip in a few thousand
# states is rounding (torch and onnxruntime sum in other orders), so the bound on
# states is looser than on single neuron values.
MAX_FLIPPED_STATES = 1e-3
MAX_FLIPPED_NEURONS = 1e-5

pytestmark = pytest.mark.slow


def _key(capture) -> tuple[str, str]:
    """A probe's layer and method (a Keras capture is a layer named ``<layer>_states``)."""
    return capture.metadata.get("label", capture.name.rsplit(":", 1)[0]), capture.metadata["method"]


def _flipped(native, onnx_capture) -> tuple[int, int]:
    """(states, neuron values) recorded differently by the two paths, row by row.

    A state may differ only in a neuron or two, rounded to the other side of zero
    by the other runtime's order of operations: a wrong axis or layout would
    change many neurons of most states.
    """
    rows_a, rows_b = native.states[:], onnx_capture.states[:]
    assert rows_a.shape == rows_b.shape, (native.name, rows_a.shape, rows_b.shape)
    bits = np.unpackbits(rows_a ^ rows_b, axis=1).sum(axis=1)
    assert bits.max(initial=0) <= 2, f"{native.name}: a state differs in {bits.max()} neurons"
    return int(np.count_nonzero(bits)), int(bits.sum())


def _assert_same_states(native_captures, onnx_captures, what: str) -> None:
    """Same probes, neurons and state counts; states and neuron values flipped by rounding
    below the bounds above."""
    native = {_key(c): c for c in native_captures}
    onnx = {_key(c): c for c in onnx_captures}
    assert sorted(native) == sorted(onnx), f"{what}: probes differ"
    assert native, f"{what}: nothing was probed"
    for name, capture in native.items():
        other = onnx[name]
        assert capture.n_neurons == other.n_neurons, (what, name, capture.n_neurons, other.n_neurons)
        assert capture.state_count == other.state_count, (what, name, capture.state_count, other.state_count)
        states, neurons = _flipped(capture, other)
        assert states / capture.state_count < MAX_FLIPPED_STATES or states <= 1, (what, name, states)
        # (One flipped value is rounding however few a probe holds, as one flipped state is.)
        assert neurons / (capture.state_count * capture.n_neurons) < MAX_FLIPPED_NEURONS or neurons <= 1, (
            what, name, neurons,
        )


# --------------------------------------------------------------------------- torchvision


def _vit(torchvision):
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10
    )


# name: (builder, attach_to, input side, method)
_TORCHVISION = {
    "resnet18": (lambda tv: tv.models.resnet18(num_classes=10), ["Conv2d", "ReLU"], 32, "after"),
    "mobilenet_v3_small": (
        lambda tv: tv.models.mobilenet_v3_small(num_classes=10), ["Conv2d", "Hardswish"], 32, "after",
    ),
    "efficientnet_b0": (lambda tv: tv.models.efficientnet_b0(num_classes=10), ["Conv2d", "SiLU"], 32, "after"),
    "convnext_tiny": (lambda tv: tv.models.convnext_tiny(num_classes=10), ["Conv2d", "Linear"], 32, "after"),
    "regnet_y_400mf": (lambda tv: tv.models.regnet_y_400mf(num_classes=10), ["Conv2d", "ReLU"], 32, "after"),
    "densenet121": (lambda tv: tv.models.densenet121(num_classes=10), ["Conv2d"], 32, "after"),
    "vit": (_vit, ["Linear", "LayerNorm", "GELU"], 32, "after"),
    "shufflenet_v2": (
        lambda tv: tv.models.shufflenet_v2_x0_5(num_classes=10), ["Conv2d", "ReLU", "InvertedResidual"], 32, "both",
    ),
}

# Module classes whose inputs and outputs come out of functional ops the hooks
# cannot follow (ShuffleNet's chunk and channel shuffle; see the README's
# limitations): the hooks are given their channel axis, the ONNX path must find it.
_AXIS_GIVEN_TO_HOOKS = {"shufflenet_v2": "InvertedResidual"}


@pytest.mark.parametrize("arch", list(_TORCHVISION))
def test_torchvision_native_hooks_match_the_onnx_path(torch, torchvision, arch):
    from models.torch_models import randomize_batchnorm
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import attach_hooks, remove_state_layers

    build, attach_to, side, method = _TORCHVISION[arch]
    torch.manual_seed(0)
    model = randomize_batchnorm(build(torchvision).eval())
    x = torch.randn(6, 3, side, side, generator=torch.Generator().manual_seed(1))
    exported = from_torch(model, x[:2])
    onnx_model = OnnxEfficiencyModel(exported, attach_to, method=method, providers="cpu", keep_states=True)
    outputs = onnx_model.predict(x.numpy(), batch_size=3)
    given = _AXIS_GIVEN_TO_HOOKS.get(arch)
    axes = {name: 1 for name, sub in model.named_modules() if type(sub).__name__ == given}
    attach_hooks(model, attach_to, method=method, channel_axes=axes)
    try:
        with torch.no_grad():
            expected = torch.cat([model(part) for part in x.split(3)])
        np.testing.assert_allclose(outputs, expected.numpy(), atol=1e-3)
        _assert_same_states(model.efficiency_layers, onnx_model.efficiency_layers, arch)
    finally:
        remove_state_layers(model)


# --------------------------------------------------------------------------- keras.applications

_KERAS = {
    "MobileNetV2": ("Conv2D", "DepthwiseConv2D", "Dense"),
    "EfficientNetB0": ("Conv2D", "DepthwiseConv2D", "Dense"),
    "ResNet50": ("Conv2D", "Dense"),
}


@pytest.mark.parametrize("arch", list(_KERAS))
def test_keras_applications_native_layers_match_the_onnx_path(keras, arch):
    from models.keras_models import randomize_batchnorm
    from tensorstate_onnx.keras_capture import build_keras_efficiency_model

    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, arch)(weights=None, input_shape=(32, 32, 3), classes=10)
    randomize_batchnorm(model)
    x = np.random.default_rng(2).uniform(0, 255, size=(4, 32, 32, 3)).astype(np.float32)
    native = build_keras_efficiency_model(model, list(_KERAS[arch]))
    expected = native.predict(x, batch_size=2, verbose=0)
    names = sorted({capture.label for capture in native.efficiency_layers})
    onnx_model = build_efficiency_model(model, names, runtime="onnxruntime", providers="cpu", keep_states=True)
    outputs = onnx_model.predict(x, batch_size=2)
    np.testing.assert_allclose(outputs, expected, atol=1e-4)
    _assert_same_states(native.efficiency_layers, onnx_model.efficiency_layers, arch)
