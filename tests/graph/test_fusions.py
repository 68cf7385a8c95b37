"""Probing never changes a model's outputs, not even in the last bit, on graphs that
trigger onnxruntime's rounding-changing fusions (SkipLayerNormalization, bias + GELU,
Conv + BatchNormalization + activation, attention blocks): every op type of each
exported model is probed, alone and all together, before and after."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest

from tensorstate_onnx.runtime import OnnxEfficiencyModel


def _models(torch):
    nn = torch.nn

    class Skip(nn.Module):  # Linear, residual Add, LayerNorm: SkipLayerNormalization
        def __init__(self):
            super().__init__()
            self.fc, self.ln = nn.Linear(16, 16), nn.LayerNorm(16)

        def forward(self, x):
            return self.ln(x + self.fc(x))

    class Mlp(nn.Module):  # Linear + GELU (erf or tanh): BiasGelu / FastGelu
        def __init__(self, approximate):
            super().__init__()
            self.fc, self.act, self.out = nn.Linear(16, 32), nn.GELU(approximate=approximate), nn.Linear(32, 4)

        def forward(self, x):
            return self.out(self.act(self.fc(x)))

    class ConvBlock(nn.Module):  # Conv + BatchNorm + SiLU / ReLU, residual Add
        def __init__(self):
            super().__init__()
            self.c1, self.bn, self.act = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU()
            self.c2, self.relu = nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()

        def forward(self, x):
            return self.relu(x + self.c2(self.act(self.bn(self.c1(x)))))

    return {
        "skip_layernorm": (Skip(), (4, 5, 16)),
        "bias_gelu": (Mlp("none"), (4, 5, 16)),
        "fast_gelu": (Mlp("tanh"), (4, 5, 16)),
        "conv_bn_act": (ConvBlock(), (4, 8, 12, 12)),
        "encoder_layer": (nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True), (4, 5, 16)),
        "gelu_encoder_layer": (
            nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu", batch_first=True, norm_first=True),
            (4, 5, 16),
        ),
    }


@pytest.mark.parametrize("name", ["skip_layernorm", "bias_gelu", "fast_gelu", "conv_bn_act", "encoder_layer", "gelu_encoder_layer"])
def test_probing_any_op_type_keeps_outputs_bit_identical(torch, name):
    from models.torch_models import randomize_batchnorm
    from tensorstate_onnx.converters import from_torch

    torch.manual_seed(0)
    module, shape = _models(torch)[name]
    module = randomize_batchnorm(module.eval())
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    exported = from_torch(module, x[:2])
    plain = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    want = plain.run(None, {plain.get_inputs()[0].name: x.numpy()})
    op_types = sorted({node.op_type for node in exported.graph.node} - {"Constant", "Shape"})
    changed = []
    for attach_to in [[op] for op in op_types] + [op_types]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # op types that match no float tensor warn
            try:
                probed = OnnxEfficiencyModel(exported, attach_to, method="both", providers="cpu", keep_states=False)
            except ValueError:  # an op type whose tensors are all integers has nothing to probe
                continue
            got = probed.run(x.numpy())
        if not all(np.array_equal(g, w) for g, w in zip(got, want, strict=True)):
            changed.append(attach_to)
    assert not changed, f"probing {changed} changed the outputs of {name}"


def test_packing_in_graph_keeps_outputs_bit_identical(torch):
    """With pack_in_graph the packing ops read a probe's duplicate: one that reads
    nothing private (a residual Add before a LayerNormalization) stays a graph output
    too, or onnxruntime's common-subexpression elimination merges it back into the
    original and the SkipLayerNormalization fusion is lost."""
    from tensorstate_onnx.converters import from_torch

    torch.manual_seed(0)
    module, shape = _models(torch)["encoder_layer"]
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    exported = from_torch(module.eval(), x[:2])
    plain = ort.InferenceSession(exported.SerializeToString(), providers=["CPUExecutionProvider"])
    want = plain.run(None, {plain.get_inputs()[0].name: x.numpy()})
    for attach_to in (["Add"], ["LayerNormalization"]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probed = OnnxEfficiencyModel(exported, attach_to, method="both", providers="cpu", pack_in_graph=True)
        got = probed.run(x.numpy())
        assert all(np.array_equal(g, w) for g, w in zip(got, want, strict=True)), attach_to
