"""The graph edits behind a probe: new outputs, isolated producers, in-graph packing.

Every name the editor adds is fresh in the graph. Exposing a tensor whose
producer onnxruntime would fuse with a reader is done through a duplicate of the
producer, so the original outputs stay bit-identical to the unprobed model's.
A float32/float64 probe leaves the session quantized, as the bool tensor
``x > 0`` (a quarter or an eighth of the bytes to copy out, reorder from
onnxruntime's blocked layouts and pack). With packing, the graph itself also
bit-packs a probe so only ``uint8[n_states, ceil(C/8)]`` leaves the session
(with the probed tensor's shape, for tensors of rank >= 3: their rows are put in
batch order on the host).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .index import GraphIndex, fresh_name
from .io import elem_type_of, shape_of

__all__ = ["MIN_PACK_OPSET", "Editor", "all_names", "default_opset"]

#: First default-domain opset where ReduceSum takes its axes as an input (what packing uses).
MIN_PACK_OPSET = 13

# Ops whose output onnxruntime folds into a consumer from _FUSION_PARTNERS in a way
# that changes rounding (Conv+BatchNormalization, Conv+Add "sum" fusion, MatMul+Add
# into Gemm, ...). Exposing such an output as a graph output blocks the fusion, so
# the original outputs would differ in the last bits from the unprobed model.
_FUSIBLE_PRODUCERS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
_FUSION_PARTNERS = frozenset({"BatchNormalization", "Add", "Sum", "Sub", "Mul", "Div"})
# SkipLayerNormalization: a residual Add (and the bias Add before it) read by a
# LayerNormalization are added and normalized in one pass, with other rounding.
_NORMS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization"})
# A duplicate's input that only the original node reads, made by one of these ops,
# is duplicated too: a second reader would block the fusion it is part of.
_CHAINED = frozenset({"Add", "MatMul", "Gemm", "Conv"})
_MAX_CHAIN = 3
# Probes of these types leave the session as ``x > 0`` (Greater has kernels for
# both on every provider from opset 9; onnxruntime implements no Greater-1);
# float16 stays as it is, already two bytes a value.
_QUANTIZED_TYPES = frozenset({TensorProto.FLOAT, TensorProto.DOUBLE})
_MIN_QUANTIZE_OPSET = 9


@dataclass
class Editor:
    """Edits a graph: appends nodes, initializers and outputs under names not used in it yet."""

    graph: onnx.GraphProto
    taken: set[str]
    ir_version: int
    opset: int  # of the default domain
    initializers: dict[str, int] = field(init=False)
    # Tensors only duplicates compute or read (private initializer copies and the
    # outputs of duplicates that read one): onnxruntime's common-subexpression
    # elimination cannot merge a node reading one of them with an original node.
    _private: set[str] = field(init=False, default_factory=set)
    #: Packed output -> the graph output carrying its tensor's shape, for packed
    #: tensors of rank >= 3 whose samples may lie on another axis than 0 (the
    #: packed rows are put in batch order on the host; see ``capture.batch_axis``).
    shape_outputs: dict[str, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.initializers = {t.name: k for k, t in enumerate(self.graph.initializer)}

    def fresh(self, base: str) -> str:
        """A tensor or node name not used anywhere in the graph yet."""
        name = fresh_name(base, self.taken)
        self.taken.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        """Add an initializer holding ``value`` and return its name."""
        return self._add_initializer(numpy_helper.from_array(value, self.fresh(base)))

    def _add_initializer(self, tensor: TensorProto) -> str:
        """Append an initializer (declared as a graph input too, as IR < 4 requires)."""
        self.graph.initializer.append(tensor)
        if self.ir_version < 4:
            declared = helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims)
            self.graph.input.append(declared)
        return tensor.name

    def node(self, op: str, inputs: list[str], base: str, **attrs) -> str:
        """Append a node with one fresh output named after ``base``; return the output."""
        out = self.fresh(base)
        self.graph.node.append(helper.make_node(op, inputs, [out], name=self.fresh(base), **attrs))
        return out

    def output(self, tensor: str, index: GraphIndex, axis: int, pack: bool) -> str:
        """Add the graph output that carries ``tensor`` (packed on ``axis`` if ``pack``); return it."""
        tensor_type = index.types[tensor]
        source = self.isolate(tensor, index)
        # A duplicate that reads only what its original reads must stay a graph output:
        # read only by nodes, onnxruntime's common-subexpression elimination merges it
        # back into the original (and the fusion it was made to keep is blocked again).
        mergeable = source != tensor and source not in self._private
        if pack:
            if mergeable:
                self._expose(source, tensor_type, index, quantize=False)
            return self._expose_packed(source, tensor_type, axis)
        return self._expose(source, tensor_type, index, quantize=not mergeable)

    def _expose(self, source: str, tensor_type: onnx.TypeProto, index: GraphIndex, quantize: bool) -> str:
        """The graph output that carries ``source``: with ``quantize``, ``source > 0``
        as a new bool output for float32/float64 tensors, else ``source`` itself (a
        tensor that already is a graph output stays as it is); return the output name."""
        if source in index.graph_outputs:
            return source
        elem_type = elem_type_of(tensor_type)
        if quantize and elem_type in _QUANTIZED_TYPES and self.opset >= _MIN_QUANTIZE_OPSET:
            fired = self._fired(source, elem_type, source)
            declared = onnx.TypeProto()
            declared.CopyFrom(tensor_type)
            declared.tensor_type.elem_type = TensorProto.BOOL
            self.graph.output.append(_output_value_info(fired, declared))
            return fired
        self.graph.output.append(_output_value_info(source, tensor_type))
        index.graph_outputs.add(source)
        return source

    def _expose_packed(self, source: str, tensor_type: onnx.TypeProto, axis: int) -> str:
        """Add the packing ops for ``source`` and their uint8 graph output; return its name."""
        shape = shape_of(tensor_type)
        if len(shape) == 1:  # [N]: one neuron per sample; the Reshape in pack() makes it [N, 1]
            shape, axis = (shape[0], 1), 1
        n_neurons = shape[axis]
        packed, fired = self.pack(source, elem_type_of(tensor_type), len(shape), axis, n_neurons)
        if len(shape) >= 3 and axis != 0:
            sizes = self.node("Shape", [fired], f"{packed}_shape")
            self.graph.output.append(helper.make_tensor_value_info(sizes, TensorProto.INT64, [len(shape)]))
            self.shape_outputs[packed] = sizes
        others = [d for k, d in enumerate(shape) if k != axis]
        n_states = int(np.prod(others)) if None not in others else f"{packed}_states"
        self.graph.output.append(
            helper.make_tensor_value_info(packed, TensorProto.UINT8, [n_states, -(-n_neurons // 8)])
        )
        return packed

    def isolate(self, tensor: str, index: GraphIndex) -> str:
        """The tensor to expose for ``tensor``: itself, or the output of a duplicate of
        its producer when exposing it would block a rounding-changing ORT fusion.

        The duplicate reads the same inputs, so it computes the tensor exactly as the
        unfused graph does, while the original producer stays free to be fused.
        """
        if tensor in index.graph_outputs or tensor not in index.producer:
            return tensor
        if not _blocks_fusion(tensor, index):
            return tensor
        return self._duplicate(tensor, index, _MAX_CHAIN)

    def _duplicate(self, tensor: str, index: GraphIndex, depth: int) -> str:
        """Append a copy of ``tensor``'s producer (and of the single-reader fusion chain
        it reads, ``depth`` nodes up); return the copy of ``tensor``."""
        node_index, position = index.producer[tensor]
        producer = index.graph.node[node_index]
        duplicate = onnx.NodeProto()
        duplicate.CopyFrom(producer)
        duplicate.name = self.fresh(f"{producer.name}__probe")
        duplicate.input[:] = [self._chain_input(name, index, depth) for name in producer.input]
        duplicate.output[:] = [self.fresh(f"{o}__probe") if o else "" for o in producer.output]
        if self._private.intersection(duplicate.input):
            self._private.update(o for o in duplicate.output if o)
        self.graph.node.append(duplicate)
        return duplicate.output[position]

    def _chain_input(self, name: str, index: GraphIndex, depth: int) -> str:
        """What a duplicate reads for ``name``: a private initializer copy, a duplicate of
        a single-reader fusion-chain tensor, or ``name`` itself."""
        if name in self.initializers:
            return self._copy_initializer(name)
        chained = (
            depth > 0 and name in index.producer and name not in index.graph_outputs
            and len(index.consumers.get(name, ())) == 1
            and index.graph.node[index.producer[name][0]].op_type in _CHAINED
        )  # fmt: skip
        return self._duplicate(name, index, depth - 1) if chained else name

    def _copy_initializer(self, name: str) -> str:
        """A private copy of initializer ``name`` (other inputs are returned as they are).

        Without it onnxruntime's common-subexpression elimination merges the
        duplicate back into the original node, which brings the blocked fusion back.
        """
        if name not in self.initializers:
            return name
        copy = TensorProto()
        copy.CopyFrom(self.graph.initializer[self.initializers[name]])
        copy.name = self.fresh(f"{name}__probe")
        self._private.add(copy.name)
        return self._add_initializer(copy)

    def pack(self, tensor: str, elem_type: int, rank: int, axis: int, n_neurons: int) -> tuple[str, str]:
        """Append ops that quantize (``> 0``) and bit-pack ``tensor``; return the uint8
        output and the boolean firing pattern (``tensor > 0``, in ``tensor``'s shape).

        ``x > 0`` -> channels last -> ``(-1, C)`` -> zero-pad C to a multiple of 8 ->
        ``(-1, C/8, 8)`` -> weights 1, 2, ..., 128 summed per byte -> uint8. The sum
        runs in float32 (exact for 0..255) because every onnxruntime provider
        implements Mul and ReduceSum for it.
        """
        base = f"{tensor}__packed"
        quantized = self._fired(tensor, elem_type, base)
        fired = quantized
        if axis != rank - 1:
            perm = [k for k in range(rank) if k != axis] + [axis]
            fired = self.node("Transpose", [fired], f"{base}_last", perm=perm)
        n_bytes = -(-n_neurons // 8)
        shape_2d = self.const(f"{base}_shape2d", np.array([-1, n_neurons], dtype=np.int64))
        flat = self.node("Reshape", [fired, shape_2d], f"{base}_2d")
        bits = self.node("Cast", [flat], f"{base}_f32", to=TensorProto.FLOAT)
        if n_neurons % 8:
            pads = np.array([0, 0, 0, n_bytes * 8 - n_neurons], dtype=np.int64)
            bits = self.node("Pad", [bits, self.const(f"{base}_pads", pads)], f"{base}_pad")
        shape_3d = self.const(f"{base}_shape3d", np.array([-1, n_bytes, 8], dtype=np.int64))
        groups = self.node("Reshape", [bits, shape_3d], f"{base}_3d")
        weights = self.const(f"{base}_weights", (2.0 ** np.arange(8)).astype(np.float32))
        weighted = self.node("Mul", [groups, weights], f"{base}_weighted")
        axes = self.const(f"{base}_axes", np.array([-1], dtype=np.int64))
        summed = self.node("ReduceSum", [weighted, axes], f"{base}_sum", keepdims=0)
        return self.node("Cast", [summed], base, to=TensorProto.UINT8), quantized

    def _fired(self, tensor: str, elem_type: int, base: str) -> str:
        """Boolean ``tensor > 0`` (bool tensors are their own firing pattern)."""
        if elem_type == TensorProto.BOOL:
            return tensor
        if elem_type == TensorProto.FLOAT16:  # Greater has no float16 kernel on every provider
            tensor = self.node("Cast", [tensor], f"{base}_f32in", to=TensorProto.FLOAT)
            elem_type = TensorProto.FLOAT
        zero = self.const(f"{base}_zero", np.zeros((), helper.tensor_dtype_to_np_dtype(elem_type)))
        return self.node("Greater", [tensor, zero], f"{base}_fired")


def all_names(graph: onnx.GraphProto, node_names: list[str]) -> set[str]:
    """Every node and tensor name of the main graph (to keep added names unique)."""
    names = set(node_names)
    names.update(vi.name for vi in (*graph.input, *graph.output, *graph.value_info))
    names.update(init.name for init in graph.initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ONNX domain the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _output_value_info(name: str, tensor_type: onnx.TypeProto) -> onnx.ValueInfoProto:
    """A graph output declaration for ``name``; anonymous dims get a dim_param."""
    dims = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{name}_dim{k}")
        for k, d in enumerate(tensor_type.tensor_type.shape.dim)
    ]
    return helper.make_tensor_value_info(name, tensor_type.tensor_type.elem_type, dims)


def _blocks_fusion(tensor: str, index: GraphIndex) -> bool:
    """Whether exposing ``tensor`` would keep onnxruntime from a fusion that changes
    rounding: a conv/matmul output read by a BatchNormalization or arithmetic, an
    Add read by a LayerNormalization, or an Add read only by such an Add."""
    op = index.graph.node[index.producer[tensor][0]].op_type
    readers = [index.graph.node[i] for i in index.consumers.get(tensor, ())]
    if op in _FUSIBLE_PRODUCERS:
        return any(reader.op_type in _FUSION_PARTNERS for reader in readers)
    if op != "Add":
        return False
    if any(reader.op_type in _NORMS for reader in readers):
        return True
    return len(readers) == 1 and readers[0].op_type == "Add" and any(
        index.graph.node[i].op_type in _NORMS for i in index.consumers.get(readers[0].output[0], ())
    )
