"""A MobileNetV2-style ONNX model built directly with ``onnx.helper``.

It lets the ONNX path (graph rewriting, runtime, counting) be tested and
benchmarked with a realistic graph — Conv with groups, BatchNormalization, Clip,
residual Add, GlobalAveragePool, Gemm — when neither torch nor Keras is installed.
The weights are random, so the model classifies nothing; they are scaled so that
activations keep a useful spread through the whole network and neurons fire
about half of the time.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models import (
    MOBILENET_V2_SMALL_BLOCKS,
    MOBILENET_V2_SMALL_LAST,
    MOBILENET_V2_SMALL_STEM,
)

__all__ = ["mobilenet_v2_small_onnx"]

_MIN_OPSET = 11  # Clip takes min/max as inputs from opset 11 on.
_NUM_CLASSES = 10
_INPUT_SIZE = 96


class _GraphBuilder:
    """Accumulates nodes and initializers, naming them after torch module paths.

    Node ``features.1.conv.0.0/Conv`` writes ``features.1.conv.0.0/Conv_output_0``
    and reads weights named ``features.1.conv.0.0.weight``, like a legacy torch
    export of :class:`models.torch_models.MobileNetV2Small`.
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = [
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), "relu6.min"),
            numpy_helper.from_array(np.array(6.0, dtype=np.float32), "relu6.max"),
        ]

    def _weight(self, name: str, values: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def node(
        self, op: str, scope: str, inputs: list[str], output: str | None = None, **attrs: object
    ) -> str:
        """Append node ``{scope}/{op}`` and return the name of its single output."""
        name = f"{scope}/{op}"
        output = output or f"{name}_output_0"
        self.nodes.append(helper.make_node(op, inputs, [output], name=name, **attrs))
        return output

    def conv(
        self, x: str, scope: str, c_in: int, c_out: int, k: int, stride: int = 1,
        groups: int = 1, gain: float = 2.0,
    ) -> str:
        """Bias-free Conv with He-style weights of variance ``gain / fan_in``.

        ``gain=2`` preserves the second moment through a following ReLU; a linear
        (projection) conv uses ``gain=1``.
        """
        fan_in = (c_in // groups) * k * k
        w = self.rng.normal(0.0, np.sqrt(gain / fan_in), size=(c_out, c_in // groups, k, k))
        pad = (k - 1) // 2
        return self.node(
            "Conv", scope, [x, self._weight(f"{scope}.weight", w)],
            kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=groups,
        )

    def batch_norm(self, x: str, scope: str, c: int) -> str:
        """Inference BatchNormalization with random affine and running statistics.

        Means and shifts are small and variances positive around 1, so the layer
        is close to the identity and leaves about half of the values positive.
        """
        rng = self.rng
        params = [
            self._weight(f"{scope}.weight", rng.uniform(0.8, 1.2, c)),
            self._weight(f"{scope}.bias", rng.normal(0.0, 0.1, c)),
            self._weight(f"{scope}.running_mean", rng.normal(0.0, 0.1, c)),
            self._weight(f"{scope}.running_var", rng.uniform(0.5, 1.5, c)),
        ]
        return self.node("BatchNormalization", scope, [x, *params], epsilon=1e-5)

    def relu6(self, x: str, scope: str) -> str:
        """ReLU6 as ``Clip(x, 0, 6)``, as torch exports ``nn.ReLU6``."""
        return self.node("Clip", scope, [x, "relu6.min", "relu6.max"])

    def conv_bn_relu6(
        self, x: str, scope: str, c_in: int, c_out: int, k: int, stride: int = 1,
        groups: int = 1,
    ) -> str:
        """Conv + BN + ReLU6 as modules ``{scope}.0``, ``{scope}.1``, ``{scope}.2``."""
        x = self.conv(x, f"{scope}.0", c_in, c_out, k, stride, groups)
        x = self.batch_norm(x, f"{scope}.1", c_out)
        return self.relu6(x, f"{scope}.2")

    def inverted_residual(
        self, x: str, scope: str, c_in: int, c_out: int, stride: int, expand: int
    ) -> str:
        """MobileNetV2 block under ``{scope}.conv``, with an Add when shapes allow."""
        hidden = c_in * expand
        h, j = x, 0
        if expand != 1:
            h = self.conv_bn_relu6(h, f"{scope}.conv.{j}", c_in, hidden, 1)
            j += 1
        h = self.conv_bn_relu6(h, f"{scope}.conv.{j}", hidden, hidden, 3, stride, groups=hidden)
        h = self.conv(h, f"{scope}.conv.{j + 1}", hidden, c_out, 1, gain=1.0)
        h = self.batch_norm(h, f"{scope}.conv.{j + 2}", c_out)
        if stride == 1 and c_in == c_out:
            h = self.node("Add", scope, [x, h])
        return h

    def gemm(self, x: str, scope: str, c_in: int, c_out: int, output: str) -> str:
        """Fully connected layer ``x @ W.T + b`` with torch's ``Linear`` layout."""
        w = self.rng.normal(0.0, np.sqrt(1.0 / c_in), size=(c_out, c_in))
        b = self.rng.normal(0.0, 0.01, size=c_out)
        return self.node(
            "Gemm", scope,
            [x, self._weight(f"{scope}.weight", w), self._weight(f"{scope}.bias", b)],
            output=output, transB=1,
        )


def mobilenet_v2_small_onnx(
    batch: int | None = None, seed: int = 0, opset: int = 17
) -> onnx.ModelProto:
    """Build the MobileNetV2-style network as a self-contained ONNX model.

    Input ``"input"`` is float32 ``[N, 3, 96, 96]`` and output ``"logits"`` is
    ``[N, 10]``, where ``N`` is the symbolic dimension ``"N"`` when ``batch`` is
    ``None`` and the given size otherwise. The layout follows
    :data:`models.MOBILENET_V2_SMALL_BLOCKS`; node names follow
    the torch module paths (``features.0.0/Conv``, ``features.3/Add``,
    ``classifier/Gemm``). The same ``seed`` always gives the same weights.

    Raises ``ValueError`` for a non-positive ``batch`` or an opset below 11.
    """
    if batch is not None and batch < 1:
        raise ValueError(f"batch must be a positive int or None (dynamic), got {batch!r}")
    if opset < _MIN_OPSET:
        raise ValueError(f"opset must be >= {_MIN_OPSET} (Clip with min/max inputs), got {opset}")

    g = _GraphBuilder(np.random.default_rng(seed))
    x = g.conv_bn_relu6("input", "features.0", 3, MOBILENET_V2_SMALL_STEM, 3, stride=2)
    c = MOBILENET_V2_SMALL_STEM
    for i, (expand, c_out, stride) in enumerate(MOBILENET_V2_SMALL_BLOCKS, start=1):
        x = g.inverted_residual(x, f"features.{i}", c, c_out, stride, expand)
        c = c_out
    last = len(MOBILENET_V2_SMALL_BLOCKS) + 1
    x = g.conv_bn_relu6(x, f"features.{last}", c, MOBILENET_V2_SMALL_LAST, 1)
    x = g.node("GlobalAveragePool", "pool", [x])
    x = g.node("Flatten", "flatten", [x], axis=1)
    g.gemm(x, "classifier", MOBILENET_V2_SMALL_LAST, _NUM_CLASSES, output="logits")

    n: int | str = "N" if batch is None else batch
    input_shape = [n, 3, _INPUT_SIZE, _INPUT_SIZE]
    graph = helper.make_graph(
        g.nodes,
        "mobilenet_v2_small",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [n, _NUM_CLASSES])],
        initializer=g.initializers,
    )
    opset_ids = [helper.make_opsetid("", opset)]
    model = helper.make_model(
        graph,
        opset_imports=opset_ids,
        producer_name="tensorstate_onnx",
        doc_string=f"MobileNetV2-style network with random weights (seed={seed}).",
    )
    # The lowest IR version that carries this opset, so older runtimes load it too.
    model.ir_version = helper.find_min_ir_version_for(opset_ids)
    onnx.checker.check_model(model, full_check=True)
    return model
