"""Neuron layout: on which axis of each tensor the neurons (channels) lie.

Known layouts (Conv-family ops put neurons on axis 1) propagate through
elementwise, broadcasting, reducing and Transpose ops in topological order.
Graph inputs are NCHW unless the model comes from Keras/TensorFlow, whose
inputs are channels-last. The caller may override the axis of any probe.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from onnx import helper

from .index import GraphIndex
from .metadata import KERAS_LAYER_NAME

__all__ = ["infer_channel_axes", "is_channels_last", "override_axis"]

#: Producers whose graph inputs are Keras/TensorFlow tensors, hence channels-last.
_CHANNELS_LAST_PRODUCERS = frozenset({"tf2onnx", "keras2onnx"})

# Ops whose output has its neurons on axis 1 (NCHW-style layouts).
_AXIS1_OPS = frozenset(
    {
        "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "DeformConv",
        "BatchNormalization", "InstanceNormalization", "LRN",
        "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
        "GlobalLpPool", "MaxUnpool", "MaxRoiPool", "RoiAlign",
        "DepthToSpace", "SpaceToDepth",
    }
)  # fmt: skip

# Ops whose output keeps the layout of their first non-constant input
# (elementwise, broadcasting or rank-preserving ops).
_INHERIT_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Softplus", "Softsign", "ThresholdedRelu", "Shrink",
        "Gelu", "Mish", "Clip", "Erf", "Neg", "Abs", "Sqrt", "Exp", "Log",
        "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos",
        "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Mean", "Sum",
        "Where", "Not", "And", "Or", "Xor", "Equal", "Greater", "GreaterOrEqual",
        "Less", "LessOrEqual", "IsNaN", "IsInf",
        "Identity", "Dropout", "Cast", "CastLike", "QuantizeLinear", "DequantizeLinear",
        "Softmax", "LogSoftmax", "Hardmax", "LayerNormalization", "GroupNormalization",
        "Concat", "Slice", "Pad", "Resize", "Upsample", "Split", "Tile", "Expand",
    }
)  # fmt: skip

_REDUCE_OPS = frozenset(
    {
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
        "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    }
)  # fmt: skip


def is_channels_last(model: onnx.ModelProto) -> bool:
    """Whether the model comes from Keras/TensorFlow (by its producer or from_keras's
    node metadata), whose inputs are channels-last even where its Convs compute NCHW."""
    return model.producer_name in _CHANNELS_LAST_PRODUCERS or any(
        prop.key == KERAS_LAYER_NAME for node in model.graph.node for prop in node.metadata_props
    )


def infer_channel_axes(index: GraphIndex, channels_last: bool) -> dict[str, int]:
    """Neuron axis of every tensor, propagated through the graph in topological order.

    ``channels_last`` says the graph inputs are Keras/TensorFlow tensors (see
    :func:`is_channels_last`). Axes are non-negative where the rank is known;
    ``-1`` stands for "last axis" of a tensor of unknown rank.
    """
    axes = {name: _graph_input_axis(name, index, channels_last) for name in index.graph_inputs}
    for node in index.graph.node:
        for name in node.output:
            axes[name] = _normalize(_output_axis(node, axes, index), index.rank(name))
    return axes


def _normalize(axis: int, rank: int | None) -> int:
    """Make ``axis`` non-negative when the rank is known (last axis if out of range)."""
    if not rank:
        return axis
    return axis % rank if -rank <= axis < rank else rank - 1


def _graph_input_axis(name: str, index: GraphIndex, channels_last: bool) -> int:
    """Axis 1 of image-like (rank >= 3) inputs, last otherwise.

    Inputs of Keras/TensorFlow models are channels-last (tf2onnx feeds a 1-channel
    NHWC image to a Reshape, a Dense layer reads any rank) unless only Conv-family
    ops read them (tf2onnx's ``inputs_as_nchw``). Elsewhere a rank >= 3 input that
    is only read by Transposes has its neurons on the axis the Transpose moves to 1.
    """
    rank = index.rank(name)
    if rank is None or rank < 3:
        return _normalize(-1, rank)
    if channels_last:
        return _normalize(_reader_axis(name, index), rank)
    readers = [index.graph.node[i] for i in sorted(index.consumers.get(name, ()))]
    perms = {tuple(_transpose_perm(node, rank)) for node in readers if node.op_type == "Transpose"}
    if readers and len(perms) == 1 and all(node.op_type == "Transpose" for node in readers):
        return perms.pop()[1]
    return 1


def _output_axis(node: onnx.NodeProto, axes: dict[str, int], index: GraphIndex) -> int:
    """Neuron axis of ``node``'s outputs, from its op type and its data input's axis."""
    op = node.op_type
    if op in _AXIS1_OPS:
        return 1
    source = next(
        (name for name in node.input if name and name not in index.constants and name in axes),
        None,
    )
    if source is None:
        return -1
    keeps_layout = op in _INHERIT_OPS or (op in _REDUCE_OPS and _attr(node, "keepdims", 1))
    if keeps_layout:
        return _broadcast_axis(axes[source], index.rank(source), index.rank(node.output[0]))
    if op == "Transpose" and axes[source] >= 0 and index.rank(source):
        return list(_transpose_perm(node, index.rank(source))).index(axes[source])
    return _reader_axis(node.output[0], index)


def _reader_axis(tensor: str, index: GraphIndex) -> int:
    """Axis 1 when every reader takes ``tensor`` as its NCHW data input, else -1 (last).

    For tensors whose layout nothing upstream fixes: outputs of layout-free ops
    (tf2onnx replaces the NHWC->NCHW Transpose before a Conv by a Reshape when
    the image has one channel; the Conv reads its axis 1 as channels) and the
    inputs of Keras/TensorFlow models.
    """
    readers = [index.graph.node[i] for i in index.consumers.get(tensor, ())]
    nchw = bool(readers) and all(
        node.op_type in _AXIS1_OPS and node.input[0] == tensor for node in readers
    )
    return 1 if nchw else -1


def _broadcast_axis(axis: int, rank_in: int | None, rank_out: int | None) -> int:
    """Axis of an input dimension in a broadcast output (leading dims may be added)."""
    if axis < 0 or rank_in is None or rank_out is None:
        return axis
    return axis + rank_out - rank_in


def _transpose_perm(node: onnx.NodeProto, rank: int) -> list[int]:
    """The ``perm`` of a Transpose node (reversed axes by default)."""
    perm = _attr(node, "perm", None)
    return list(perm) if perm else list(range(rank))[::-1]


def _attr(node: onnx.NodeProto, name: str, default):
    """Value of a node attribute, or ``default`` if absent."""
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def override_axis(
    axis: int, rank: int, overrides: Mapping[str, int], *, probe_name: str, tensor: str, label: str
) -> int:
    """The caller's axis for a probe of ``tensor`` (keyed by probe name, tensor name or
    label), normalized; ``axis`` when ``overrides`` names none of them."""
    for key in (probe_name, tensor, label):
        if key in overrides:
            axis = overrides[key]
            if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
                raise TypeError(f"channel_axes[{key!r}] must be an int, got {axis!r}")
            if not -rank <= axis < rank:
                raise ValueError(
                    f"channel_axes[{key!r}] = {axis} is out of range for tensor "
                    f"{tensor!r} of rank {rank}"
                )
            return int(axis) % rank
    return axis
