"""Neuron layout: on which axis of each tensor the neurons (channels) lie (DESIGN §1).

Every tensor's axis follows from the op that produced it, in topological order:

* the conv family (Conv, ConvTranspose, BatchNormalization, InstanceNormalization,
  GroupNormalization, pooling, LRN, ...) puts its neurons on axis 1;
* dense and sequence ops (Gemm, MatMul, LayerNormalization, attention,
  LSTM/GRU/RNN, Gather from an embedding table) put them on the last axis;
* elementwise, broadcasting and rank-preserving ops inherit the axis of the
  tensor they read; Transpose permutes it, Squeeze/Unsqueeze shift it, Gather
  and reductions without ``keepdims`` shift it past the removed axes, and
  Reshape/Flatten keep it only when they leave that axis untouched (the same
  dimension with the same dimensions before or after it), else the last axis;
* a rank-1 tensor ``[N]`` is one neuron per sample (axis 1 of its ``[N, 1]``
  view) and a rank-2 tensor whose producer says nothing has its neurons last.

A tensor whose producer fixes no layout (a graph input, an op of unknown
layout, a Reshape nothing explains) takes the axis its readers read as neurons:
axis 1 for a conv-family data input, the last axis for a MatMul/Gemm/
LayerNormalization data input, looking through elementwise ops, Transposes,
Squeeze/Unsqueeze and Reshapes that leave that axis whole. Where nothing decides, the last axis is taken and the tensor is
marked *guessed*; a probe of it warns (see :mod:`tensorstate_onnx.axes`).

Graph inputs of Keras/TensorFlow models are channels-last (the last axis)
unless only conv-family ops read them (tf2onnx's ``inputs_as_nchw``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .index import GraphIndex
from .metadata import KERAS_LAYER_NAME

__all__ = ["AXIS1_OPS", "CHANNEL_READERS", "Layout", "infer_channel_axes", "is_channels_last", "reshaped_axis"]

#: Producers whose graph inputs are Keras/TensorFlow tensors, hence channels-last.
_CHANNELS_LAST_PRODUCERS = frozenset({"tf2onnx", "keras2onnx"})

#: Ops whose output has its neurons on axis 1 and that read input 0 as ``[N, C, ...]``.
AXIS1_OPS = frozenset(
    {
        "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "DeformConv",
        "BatchNormalization", "InstanceNormalization", "GroupNormalization", "LRN",
        "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
        "GlobalLpPool", "MaxUnpool", "MaxRoiPool", "RoiAlign",
        "DepthToSpace", "SpaceToDepth",
    }
)  # fmt: skip

#: Conv-family ops whose reading a tensor shows that its axis 1 holds channels. Not
#: global pooling, which reduces every axis past 1 of any tensor: tf2onnx lowers a
#: mean over the last axis of a channels-last ``[N, L, D]`` tensor (a Keras
#: LayerNormalization's moments) to a GlobalAveragePool.
CHANNEL_READERS = AXIS1_OPS - {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}

# Ops whose output has its neurons on the last axis (dense and sequence layers).
_LAST_OPS = frozenset(
    {
        "Gemm", "MatMul", "MatMulInteger", "QLinearMatMul", "FusedMatMul",
        "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization", "RMSNormalization", "EmbedLayerNormalization",
        "Attention", "MultiHeadAttention", "GroupQueryAttention",
        "LSTM", "GRU", "RNN",
    }
)  # fmt: skip

# Ops that read their input 0 as ``[..., features]``.
_DENSE_READERS = frozenset(
    {"Gemm", "MatMul", "FusedMatMul", "LayerNormalization", "SkipLayerNormalization",
     "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RMSNormalization",
     "LSTM", "GRU", "RNN", "Attention", "MultiHeadAttention"}
)  # fmt: skip

# Ops whose output keeps the layout of their data input (elementwise, broadcasting
# or rank-preserving ops).
_INHERIT_OPS = frozenset(
    {
        "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid",
        "HardSwish", "Tanh", "Softplus", "Softsign", "ThresholdedRelu", "Shrink",
        "Gelu", "FastGelu", "BiasGelu", "QuickGelu", "Mish", "Swish", "Clip", "Erf", "Neg",
        "Abs", "Sqrt", "Exp", "Log", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin",
        "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh", "Asinh", "Acosh", "Atanh",
        "Add", "Sub", "Mul", "Div", "Pow", "Mod", "Max", "Min", "Mean", "Sum",
        "Where", "Not", "And", "Or", "Xor", "Equal", "Greater", "GreaterOrEqual",
        "Less", "LessOrEqual", "IsNaN", "IsInf", "BitShift",
        "Identity", "Dropout", "Cast", "CastLike", "QuantizeLinear", "DequantizeLinear",
        "Softmax", "LogSoftmax", "Hardmax", "LpNormalization", "MeanVarianceNormalization",
        "Concat", "Slice", "Pad", "Resize", "Upsample", "Split", "Tile", "Expand",
        "Trilu", "CumSum", "ReverseSequence", "ScatterElements", "ScatterND",
    }
)  # fmt: skip

_REDUCE_OPS = frozenset(
    {
        "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
        "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare",
    }
)  # fmt: skip

_UNKNOWN = (None, True)  # no rule: let the readers decide, else guess


@dataclass
class Layout:
    """The neuron axis of every tensor, and which of them are guesses.

    Axes are non-negative where the rank is known (``1`` for rank-1 tensors, the
    neurons of their ``[N, 1]`` view); ``-1`` stands for "last axis" of a tensor
    of unknown rank.
    """

    axes: dict[str, int] = field(default_factory=dict)
    guessed: set[str] = field(default_factory=set)
    #: Tensors whose axis is the last-axis fallback of a tensor no rule or reader
    #: explained (a Reshape that split the neuron axis), or was carried from one:
    #: readers of such a tensor still decide (a channel shuffle read by a Conv).
    fallback: set[str] = field(default_factory=set)

    def set(self, name: str, axis: int, guessed: bool, fallback: bool = False) -> None:
        self.axes[name] = axis
        for flag, names in ((guessed, self.guessed), (fallback, self.fallback)):
            if flag:
                names.add(name)
            else:
                names.discard(name)


def is_channels_last(model: onnx.ModelProto) -> bool:
    """Whether the model comes from Keras/TensorFlow (by its producer or from_keras's
    node metadata), whose inputs are channels-last even where its Convs compute NCHW."""
    return model.producer_name in _CHANNELS_LAST_PRODUCERS or any(
        prop.key == KERAS_LAYER_NAME for node in model.graph.node for prop in node.metadata_props
    )


def infer_channel_axes(index: GraphIndex, channels_last: bool) -> Layout:
    """Neuron axis of every tensor of the main graph (see the module docstring).

    ``channels_last`` says the graph inputs are Keras/TensorFlow tensors (see
    :func:`is_channels_last`).
    """
    ctx = _Context(index)
    layout = Layout()
    for name in index.graph_inputs:
        axis, guessed = _graph_input_axis(name, ctx, channels_last)
        layout.set(name, *_settle(name, axis, guessed, ctx))
    for node in index.graph.node:
        results = _output_axes(node, layout, ctx)
        carried = _carries_fallback(node, layout, ctx)
        for name, (axis, guessed) in zip(node.output, results):
            if name:
                layout.set(name, *_settle(name, axis, guessed, ctx, carried and axis is not None))
    return layout


def _carries_fallback(node: onnx.NodeProto, layout: Layout, ctx: _Context) -> bool:
    """Whether ``node``'s outputs carry a fallback axis (see :attr:`Layout.fallback`):
    an op with no layout of its own whose data inputs (the first of a shape op; every
    one of more than one value a sample of an elementwise op) all have one."""
    op = node.op_type
    if op in AXIS1_OPS or op in _LAST_OPS or not node.input:
        return False
    if op in _INHERIT_OPS or op in _REDUCE_OPS:
        data = [name for name in node.input if name in layout.axes and ctx.rank(name) != 1]
    else:
        data = [node.input[0]] if node.input[0] in layout.axes else []
    return bool(data) and all(name in layout.fallback for name in data)


class _Context:
    """The index, with each tensor's dimensions and the graph's constant values at hand."""

    def __init__(self, index: GraphIndex):
        self.index = index
        self._initializers = {init.name: init for init in index.graph.initializer}
        self._dims: dict[str, list | None] = {}
        self.reader_axes: dict[str, int | None] = {}  # memo of _reader_axis

    def rank(self, name: str) -> int | None:
        return self.index.rank(name)

    def dims(self, name: str) -> list | None:
        """Dimensions of ``name``: ints, names of symbolic ones, None for unknown ones."""
        if name not in self._dims:
            tensor_type = self.index.types.get(name)
            if tensor_type is None or not tensor_type.tensor_type.HasField("shape"):
                self._dims[name] = None
            else:
                self._dims[name] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in tensor_type.tensor_type.shape.dim
                ]
        return self._dims[name]

    def ints(self, name: str) -> list[int] | None:
        """The values of a constant integer tensor (an initializer or a Constant node)."""
        if not name:
            return None
        if name in self._initializers:
            return numpy_helper.to_array(self._initializers[name]).astype(np.int64).ravel().tolist()
        producer = self.index.producer.get(name)
        if producer is None:
            return None
        node = self.index.graph.node[producer[0]]
        if node.op_type != "Constant":
            return None
        for attr in node.attribute:
            if attr.name == "value":
                return numpy_helper.to_array(attr.t).astype(np.int64).ravel().tolist()
            if attr.name in ("value_int", "value_ints"):
                return np.atleast_1d(helper.get_attribute_value(attr)).astype(np.int64).tolist()
        return None

    def readers(self, name: str) -> list[onnx.NodeProto]:
        return [self.index.graph.node[i] for i in sorted(self.index.consumers.get(name, ()))]


def _settle(
    name: str, axis: int | None, guessed: bool, ctx: _Context, fallback: bool = False
) -> tuple[int, bool, bool]:
    """The final (axis, guessed, fallback) of ``name``: what the rule gave, else what
    its readers read, else the last axis (a guess when the rule could not tell, for
    rank >= 3; a fallback its readers may still overrule downstream). An axis carried
    from a fallback (``fallback``) also gives way to what the readers read."""
    rank = ctx.rank(name)
    if rank == 1:
        return 1, False, False  # one neuron per sample
    if axis is None or fallback:
        read = _reader_axis(name, ctx)
        if read is not None:
            return read, False, False
    if axis is None:
        wide = rank is None or rank > 2  # a rank-2 tensor's last axis is the rule, not a fallback
        return _normalize(-1, rank), guessed and wide, wide
    if rank is None:
        return axis, guessed, fallback
    if not -rank <= axis < rank:
        return rank - 1, True, fallback
    return axis % rank, guessed, fallback


def _normalize(axis: int, rank: int | None) -> int:
    """``axis`` made non-negative when the rank is known (the last axis if out of range)."""
    if not rank:
        return axis
    return axis % rank if -rank <= axis < rank else rank - 1


def _graph_input_axis(name: str, ctx: _Context, channels_last: bool) -> tuple[int | None, bool]:
    """A graph input has no producer: its readers decide; Keras inputs are channels-last."""
    rank = ctx.rank(name)
    if rank is not None and rank <= 2:
        return _normalize(-1, rank), False
    if channels_last:
        return (1 if _conv_reader_only(name, ctx) else -1), False
    return _UNKNOWN


def _conv_reader_only(name: str, ctx: _Context) -> bool:
    """Whether only conv-family ops read the Keras input ``name`` (as ``[N, C, ...]``)."""
    readers = ctx.readers(name)
    return bool(readers) and all(n.op_type in CHANNEL_READERS and n.input[0] == name for n in readers)


def _reader_axis(name: str, ctx: _Context, depth: int = 0) -> int | None:
    """The axis ``name``'s readers read as neurons, if they agree: conv-family data
    inputs read axis 1, dense ones the last axis; elementwise ops and Transposes are
    looked through. ``None`` when no reader says or they disagree."""
    if name in ctx.reader_axes:
        return ctx.reader_axes[name]
    rank = ctx.rank(name)
    if rank is None or depth > 8:
        return None
    ctx.reader_axes[name] = None  # a cycle through subgraphs reads as "no opinion"
    said: set[int] = set()
    for node in ctx.readers(name):
        op = node.op_type
        if op in AXIS1_OPS and node.input[0] == name:
            said.add(1)
        elif op in _DENSE_READERS and node.input[0] == name and not _attr(node, "transA", 0):
            said.add(rank - 1)
        elif op == "Transpose" and node.output[0]:
            inner = _reader_axis(node.output[0], ctx, depth + 1)
            perm = _transpose_perm(node, rank)
            if inner is not None and len(perm) == rank:
                said.add(perm[inner])
        elif op in _INHERIT_OPS:  # every output: the second half of a Split may be the one a Conv reads
            for out in node.output:
                inner = _reader_axis(out, ctx, depth + 1) if out and ctx.rank(out) == rank else None
                if inner is not None:
                    said.add(inner)
        elif op in ("Squeeze", "Unsqueeze", "Reshape", "Flatten") and node.input[0] == name:
            inner = _reader_axis(node.output[0], ctx, depth + 1)
            if inner is not None:  # the input axis that lands on the axis read
                back, _ = reshaped_axis(inner, ctx.dims(node.output[0]), ctx.dims(name))
                if back is not None:
                    said.add(back)
    ctx.reader_axes[name] = said.pop() if len(said) == 1 else None
    return ctx.reader_axes[name]


def _output_axes(node: onnx.NodeProto, layout: Layout, ctx: _Context) -> list[tuple[int | None, bool]]:
    """(axis, guessed) of each output of ``node``; axis None when the rule cannot tell."""
    op = node.op_type
    n = len(node.output)
    if op in AXIS1_OPS:
        return [(1, False)] * n
    index = ctx.index
    if op in _LAST_OPS:
        if op == "MatMul" and node.input[0] in index.constants and node.input[1] not in index.constants:
            return [(-2, False)] * n  # W @ x: the neurons are the rows of the result
        return [(-1, False)] * n
    data = [name for name in node.input if name and name not in index.constants and name in layout.axes]
    if op == "Gather" and node.input and node.input[0] in index.constants:
        return [(-1, False)] * n  # an embedding table looked up by ids
    if not data:
        return [_UNKNOWN] * n
    if op in _INHERIT_OPS or (op in _REDUCE_OPS and _attr(node, "keepdims", 1)):
        return [_inherited(node, data, layout, ctx)] * n
    source = node.input[0]
    if source not in layout.axes:
        return [_UNKNOWN] * n
    axis, guessed = layout.axes[source], source in layout.guessed
    rank_in, out = ctx.rank(source), node.output[0]
    if axis < 0 or rank_in is None or ctx.rank(out) is None:
        return [_UNKNOWN] * n
    if rank_in == 1:
        return [_UNKNOWN] * n  # a per-sample scalar has no feature axis to carry
    moved = _moved_axis(node, axis, rank_in, ctx)
    if moved is None:
        return [_UNKNOWN] * n
    return [(moved[0], guessed or moved[1])] * n


def _inherited(node, data: list[str], layout: Layout, ctx: _Context) -> tuple[int | None, bool]:
    """The axis an elementwise/broadcasting op carries over from its data inputs."""
    rank_out = ctx.rank(node.output[0])
    ranked = [name for name in data if ctx.rank(name) != 1]  # per-sample scalars broadcast
    best = sorted(
        ranked or data,
        key=lambda name: (name in layout.guessed, name in layout.fallback, ctx.rank(name) != rank_out),
    )
    source = best[0]
    axis, rank_in = layout.axes[source], ctx.rank(source)
    if rank_in == 1:
        return _UNKNOWN
    if axis >= 0 and rank_in is not None and rank_out is not None:
        axis += rank_out - rank_in
    return axis, source in layout.guessed


def _moved_axis(node, axis: int, rank_in: int, ctx: _Context) -> tuple[int | None, bool] | None:
    """Where a shape op moves axis ``axis`` of its input: (axis, guessed), with axis
    None when the op merges or splits it (then readers decide, else the last axis);
    None for ops that fix no layout."""
    op = node.op_type
    source, out = node.input[0], node.output[0]
    if op == "Transpose":
        perm = _transpose_perm(node, rank_in)
        return (perm.index(axis), False) if axis in perm else None
    if op in ("Squeeze", "Unsqueeze"):
        axes = _attr(node, "axes", None)
        if axes is None and len(node.input) > 1:
            axes = ctx.ints(node.input[1])
        moved = _squeezed_axis(op, axis, rank_in, ctx.rank(out), axes, ctx.dims(source))
        if moved is not None:
            return moved, False
        return reshaped_axis(axis, ctx.dims(source), ctx.dims(out))
    if op == "Reshape":
        return reshaped_axis(axis, ctx.dims(source), _reshape_target(node, ctx) or ctx.dims(out))
    if op == "Flatten":
        return reshaped_axis(axis, ctx.dims(source), ctx.dims(out))
    if op == "Gather":
        gather_axis = _attr(node, "axis", 0) % rank_in
        indices_rank = ctx.rank(node.input[1])
        if indices_rank is None or axis == gather_axis:
            return None
        return (axis if axis < gather_axis else axis + indices_rank - 1), False
    if op in _REDUCE_OPS:  # keepdims=0
        axes = _attr(node, "axes", None)
        if axes is None and len(node.input) > 1:
            axes = ctx.ints(node.input[1])
        if axes is None:
            return None
        axes = {a % rank_in for a in axes}
        # Reducing the neuron axis away leaves no rule: its readers decide, else a guess.
        return (None, True) if axis in axes else (axis - sum(a < axis for a in axes), False)
    return None


def _squeezed_axis(op: str, axis: int, rank_in: int, rank_out: int | None, axes, dims) -> int | None:
    """Where Squeeze/Unsqueeze with ``axes`` moves ``axis`` (None if unknown or squeezed)."""
    if op == "Squeeze":
        if axes is None:
            if dims is None or None in dims:
                return None
            axes = [k for k, d in enumerate(dims) if d == 1]
        axes = {a % rank_in for a in axes}
        return None if axis in axes else axis - sum(a < axis for a in axes)
    if axes is None or rank_out is None:
        return None
    inserted = {a % rank_out for a in axes}
    kept = [k for k in range(rank_out) if k not in inserted]
    return kept[axis] if axis < len(kept) else None


def _reshape_target(node: onnx.NodeProto, ctx: _Context) -> list | None:
    """The output dimensions of a Reshape from its constant shape: ``0`` copies the
    input dimension, and ``-1`` is the input's one symbolic dimension (the batch)
    when the known dimensions alone account for every other element."""
    target, dims_in = ctx.ints(node.input[1]) if len(node.input) > 1 else None, ctx.dims(node.input[0])
    if target is None or dims_in is None:
        return None
    allow_zero = _attr(node, "allowzero", 0)
    dims = [dims_in[k] if d == 0 and not allow_zero and k < len(dims_in) else d for k, d in enumerate(target)]
    if dims.count(-1) != 1:
        return dims if -1 not in dims else None
    if None in dims_in or None in dims:
        return [None if d == -1 else d for d in dims]
    left = Counter(d for d in dims_in if isinstance(d, str)) - Counter(d for d in dims if isinstance(d, str))
    known_in = int(np.prod([d for d in dims_in if isinstance(d, int)], dtype=np.int64))
    known_out = int(np.prod([d for d in dims if isinstance(d, int) and d != -1], dtype=np.int64))
    rest = known_in // known_out if known_out and known_in % known_out == 0 else None
    if sum(left.values()) == 1 and rest == 1:
        fill = next(iter(left))
    elif not left and rest is not None:
        fill = rest
    else:
        fill = None
    return [fill if d == -1 else d for d in dims]


def reshaped_axis(axis: int, dims_in, dims_out) -> tuple[int | None, bool]:
    """Where a reshape moves ``axis``: the output axis of the same size with the same
    dimensions before (or after) it; (None, False) when the reshape merges or splits
    the axis, (None, True) when the shapes are not known well enough to tell."""
    if dims_in is None or dims_out is None:
        return None, True
    size = dims_in[axis]
    before, after = dims_in[:axis], dims_in[axis + 1 :]
    for k, dim in enumerate(dims_out):
        same_before = _same_product(before, dims_out[:k])
        same_after = _same_product(after, dims_out[k + 1 :])
        if same_before and same_after:  # then the sizes agree too
            return k, False
        if size is not None and type(size) is type(dim) and size == dim and (same_before or same_after):
            return k, False
    fully_known = None not in dims_in and None not in dims_out
    return None, not fully_known


def _same_product(left: list, right: list) -> bool:
    """Whether two lists of dimensions surely have the same product (ints multiplied,
    symbolic ones compared by name; any unknown one makes it unknowable)."""
    if None in left or None in right:
        return False

    def product(dims):
        ints = [d for d in dims if isinstance(d, int)]
        return int(np.prod(ints, dtype=np.int64)), Counter(d for d in dims if isinstance(d, str))

    return product(left) == product(right)


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
