"""Tests of from_torch: PyTorch module -> ONNX, names kept, BatchNorm not folded."""

from __future__ import annotations

import ast
import tempfile
from collections import Counter

import numpy as np
import onnx
import pytest


@pytest.fixture(scope="module")
def torch_mobilenet(torch):
    from models.torch_models import MobileNetV2Small, randomize_batchnorm

    torch.manual_seed(0)
    return randomize_batchnorm(MobileNetV2Small().eval())


@pytest.fixture(scope="module")
def torch_exports(torch, torch_mobilenet):
    from tensorstate_onnx.converters import from_torch

    example = torch.zeros(1, 3, 96, 96)
    return {dynamo: from_torch(torch_mobilenet, example, dynamo=dynamo) for dynamo in (True, False)}


@pytest.mark.slow
@pytest.mark.parametrize("dynamo", [True, False])
def test_from_torch_keeps_batchnorm_and_a_dynamic_batch(
    torch, torch_mobilenet, torch_exports, dynamo, ort_session, onnx_dims
):
    model = torch_exports[dynamo]
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops["Conv"] == 22 and ops["BatchNormalization"] == 22  # nothing folded
    assert ops["Add"] == 3
    assert model.opset_import[0].version == 18 or any(o.version == 18 for o in model.opset_import if o.domain == "")
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "x"
    assert onnx_dims(inp) == ["batch", 3, 96, 96] and onnx_dims(out) == ["batch", 10]
    session = ort_session(model)
    for n in (1, 5):
        x = torch.randn(n, 3, 96, 96, generator=torch.Generator().manual_seed(n))
        (got,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(got, torch_mobilenet(x).numpy(), atol=1e-4)


@pytest.mark.parametrize("dynamo", [pytest.param(True, marks=pytest.mark.slow), False])
def test_from_torch_records_module_names_and_classes(torch_exports, dynamo, node_metadata):
    model = torch_exports[dynamo]
    convs = [node for node in model.graph.node if node.op_type == "Conv"]
    scopes = [ast.literal_eval(node_metadata(node)["pkg.torch.onnx.name_scopes"]) for node in convs]
    classes = [ast.literal_eval(node_metadata(node)["pkg.torch.onnx.class_hierarchy"]) for node in convs]
    assert scopes[0][:4] == ["", "features", "features.0", "features.0.0"]
    assert scopes[1][:6] == ["", "features", "features.1", "features.1.conv", "features.1.conv.0", "features.1.conv.0.0"]
    assert scopes[2][:5] == ["", "features", "features.1", "features.1.conv", "features.1.conv.1"]
    assert all(c[len(s) - 2].endswith("Conv2d") for s, c in zip(scopes, classes, strict=True))
    if not dynamo:
        assert convs[1].name == "/features/features.1/conv/conv.0/conv.0.0/Conv"


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_modules_held_in_a_module_list_or_dict_keep_their_names_and_classes(torch, dynamo):
    """A ModuleList or ModuleDict is never called, so the legacy exporter gives it no
    scope (``/blocks.0/MatMul``, ``/a/MatMul``): its children are still found, and
    ``attach_to=["Linear"]`` probes the same modules as the native hooks."""
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel
    from tensorstate_onnx.torch_capture import match_modules

    nn = torch.nn

    class Dense(nn.ModuleDict):  # a ModuleDict that is called (DenseNet's _DenseBlock)
        def forward(self, x):
            for layer in self.values():
                x = layer(x)
            return x

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(8, 16), nn.Linear(16, 4)])
            self.heads = nn.ModuleDict({"a": nn.Linear(4, 3)})
            self.dense = Dense({"layer1": nn.Sequential(nn.Linear(3, 5), nn.ReLU())})

        def forward(self, x):
            for block in self.blocks:
                x = torch.relu(block(x))
            return self.dense(self.heads["a"](x))

    model = Stack().eval()
    attach_to = ["Linear", "ReLU"]
    onnx_model = OnnxEfficiencyModel(from_torch(model, torch.randn(2, 5, 8), dynamo=dynamo), attach_to, providers="cpu")
    expected = [name for name, _ in match_modules(model, attach_to)]
    assert expected == ["blocks.0", "blocks.1", "heads.a", "dense.layer1.0", "dense.layer1.1"]
    assert [probe.label for probe in onnx_model.probes] == expected
    assert [probe.n_neurons for probe in onnx_model.probes] == [16, 4, 3, 5, 5]


@pytest.mark.parametrize("in_a_stage", [False, True], ids=["flat", "stage"])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_a_channel_shuffle_and_chunk_keep_the_channels_as_neurons_with_either_exporter(torch, dynamo, in_a_stage):
    """ShuffleNet's blocks end in a channel shuffle (view, transpose, view) and the next
    begins with ``x.chunk(2, 1)``, one half read by a Conv: the block output's neurons
    are its 8 channels, and the next block's input is that whole tensor, not the half
    of it (the dynamo exporter leaves the chunk's Split without module metadata), also
    where both blocks are in one stage (torchvision's ``stage2``)."""
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.runtime import OnnxEfficiencyModel

    nn = torch.nn

    def shuffle(y):
        n, c, h, w = y.shape
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)

    class Down(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(4, 4, 1, stride=2), nn.Conv2d(4, 4, 1, stride=2)

        def forward(self, x):
            return shuffle(torch.cat((self.a(x), self.b(x)), 1))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            a, b = x.chunk(2, 1)
            return shuffle(torch.cat((a, self.conv(b)), 1))

    blocks = [nn.Sequential(Down(), Block())] if in_a_stage else [Down(), Block()]
    model = nn.Sequential(nn.Conv2d(3, 4, 1), *blocks, nn.Conv2d(8, 2, 1)).eval()
    down, block = ("1.0", "1.1") if in_a_stage else ("1", "2")
    x = torch.randn(6, 3, 8, 8)
    onnx_model = OnnxEfficiencyModel(from_torch(model, x[:2], dynamo=dynamo), [down, block], method="both", providers="cpu")
    probes = {probe.name: probe for probe in onnx_model.probes}
    names = [f"{module}:{method}" for module in (down, block) for method in ("before", "after")]
    assert {name: (p.channel_axis, p.axis_guessed) for name, p in probes.items()} == dict.fromkeys(names, (1, False))
    assert probes[f"{block}:before"].tensor_name == probes[f"{down}:after"].tensor_name
    onnx_model.predict(x.numpy())
    neurons = {capture.name: capture.n_neurons for capture in onnx_model.efficiency_layers}
    assert neurons == {name: 4 if name == f"{down}:before" else 8 for name in names}


def test_from_torch_writes_only_the_path_it_is_given(torch, tmp_path, monkeypatch):
    from tensorstate_onnx.converters import from_torch
    from models.torch_models import LeNet5

    work, scratch = tmp_path / "cwd", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    module = LeNet5().train()
    for dynamo in (True, False):
        model = from_torch(module, torch.zeros(2, 1, 28, 28), dynamo=dynamo)
        assert isinstance(model, onnx.ModelProto)
        assert module.training  # the mode is restored
        assert list(work.iterdir()) == [] and list(scratch.iterdir()) == []
    target = tmp_path / "out" / "lenet.onnx"
    model = from_torch(module, (torch.zeros(1, 1, 28, 28),), path=target, input_names=["image"])
    assert sorted(p.name for p in target.parent.iterdir()) == ["lenet.onnx"]
    saved = onnx.load(str(target))
    assert [i.name for i in saved.graph.input] == ["image"]
    assert [n.op_type for n in saved.graph.node] == [n.op_type for n in model.graph.node]
    assert Counter(n.op_type for n in model.graph.node)["BatchNormalization"] == 3


def test_from_torch_hooks_record_nothing_during_export(torch):
    from tensorstate_onnx.converters import from_torch
    from models.torch_models import LeNet5
    from tensorstate_onnx.torch_capture import attach_hooks

    module = attach_hooks(LeNet5().eval(), ["Conv2d"])
    for dynamo in (True, False):
        from_torch(module, torch.zeros(2, 1, 28, 28), dynamo=dynamo)
    assert [h.state_count for h in module.efficiency_layers] == [0, 0, 0]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_from_torch_several_inputs_keywords_and_outputs(torch, dynamo, ort_session, onnx_dims):
    from tensorstate_onnx.converters import from_torch

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 3)
            self.b = torch.nn.Linear(5, 3)

        def forward(self, x, y=None):
            return self.a(x) + self.b(y), self.a(x)

    module = TwoHeads().eval()
    x, y = torch.randn(6, 4), torch.randn(6, 5)
    with torch.no_grad():
        expected = [t.numpy() for t in module(x, y)]
    for example in ((torch.zeros(1, 4), torch.zeros(1, 5)), {"y": torch.zeros(2, 5), "x": torch.zeros(2, 4)}):
        model = from_torch(module, example, dynamo=dynamo)
        assert [i.name for i in model.graph.input] == ["x", "y"]
        assert all(onnx_dims(o)[0] == "batch" for o in model.graph.output)
        got = ort_session(model).run(None, {"x": x.numpy(), "y": y.numpy()})
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(g, e, atol=1e-5)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_from_torch_names_the_inputs_a_forward_needs(torch, dynamo):
    """Example inputs the forward cannot take are refused before exporting, with its
    parameters and what to pass, on either exporter."""
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.errors import OptionError

    class Masked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, input_ids, attention_mask, scale=1.0):
            if attention_mask.dim() != 2:
                raise ValueError("attention_mask must be [batch, length]")
            return self.fc(input_ids * attention_mask) * scale

    ids = torch.zeros(2, 4)
    with pytest.raises(OptionError, match=r"Masked.forward needs attention_mask.*input_ids, attention_mask, scale \(required: input_ids, attention_mask\).*\{'input_ids': <tensor>, 'attention_mask': <tensor>\}"):
        from_torch(Masked(), {"input_ids": ids}, dynamo=dynamo)
    with pytest.raises(OptionError, match="Masked.forward takes no argument mask"):
        from_torch(Masked(), {"input_ids": ids, "attention_mask": ids, "mask": ids}, dynamo=dynamo)
    with pytest.raises(OptionError, match=r"Masked fails on example_inputs before any export \(ValueError: attention_mask must be") as info:
        from_torch(Masked(), (ids, torch.ones(2, 4, 1)), dynamo=dynamo)
    assert "could not export" not in str(info.value) and isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
def test_from_torch_dynamic_axes_override_the_defaults(torch, dynamo, ort_session, onnx_dims):
    """``dynamic_axes`` makes an image's height and width dynamic (the default is the
    batch axis only), and fixes a token input's length (the default makes it dynamic)."""
    from tensorstate_onnx.converters import from_torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
            self.embed = torch.nn.Embedding(10, 4)

        def forward(self, image, ids):
            return self.conv(image).mean(dim=(2, 3)) + self.embed(ids).mean(dim=1)

    module = Net().eval()
    example = (torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2, 5)))
    axes = {"image": {0: "batch", 2: "height", 3: "width"}, "ids": {0: "batch"}}
    model = from_torch(module, example, dynamo=dynamo, dynamic_axes=axes)
    assert [onnx_dims(i) for i in model.graph.input] == [["batch", 3, "height", "width"], ["batch", 5]]
    image, ids = torch.randn(3, 3, 12, 6), torch.randint(0, 10, (3, 5))
    with torch.no_grad():
        expected = module(image, ids).numpy()
    got = ort_session(model).run(None, {"image": image.numpy(), "ids": ids.numpy()})[0]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert [onnx_dims(i) for i in from_torch(module, example, dynamo=dynamo).graph.input] == (
        [["batch", 3, 8, 8], ["batch", "sequence"]] if dynamo else [["batch", 3, 8, 8], ["batch", 5]]
    )


def test_from_torch_refuses_dynamic_axes_that_name_no_input(torch):
    from tensorstate_onnx.converters import from_torch
    from tensorstate_onnx.errors import OptionError, OptionTypeError

    module, x = torch.nn.Linear(4, 2), torch.randn(2, 4)
    with pytest.raises(OptionError, match=r"dynamic_axes names 'x'.*\(input\).*parameter names"):
        from_torch(module, x, dynamic_axes={"x": {0: "batch"}})
    with pytest.raises(OptionError, match=r"dynamic_axes\['input'\].*axes 0..1"):
        from_torch(module, x, dynamic_axes={"input": {2: "width"}})
    with pytest.raises(OptionTypeError, match="dimension name"):
        from_torch(module, x, dynamic_axes={"input": "batch"})


def test_from_torch_bad_input(torch):
    from tensorstate_onnx.converters import from_torch
    from models.torch_models import LeNet5

    with pytest.raises(ValueError, match="example_inputs"):
        from_torch(LeNet5())
    with pytest.raises(ValueError, match="example_inputs"):
        from_torch(LeNet5(), ())
    with pytest.raises(TypeError, match="example_inputs"):
        from_torch(LeNet5(), "image")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        from_torch(object(), torch.zeros(1, 1, 28, 28))

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # Python control flow on data: torch.export cannot follow it
                return x * 2
            return x

    with pytest.raises(ValueError, match="could not export DataDependent") as info:
        from_torch(DataDependent(), torch.randn(2, 3))
    message = str(info.value)
    assert "data-dependent" in message and "dynamo=False" in message
    assert info.value.__cause__ is not None
