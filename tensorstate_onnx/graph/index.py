"""Index of an ONNX main graph: who produces and who consumes each tensor, and its type.

Every other part of the rewriter asks the index: which node writes a tensor,
which nodes read it, whether it is a constant, its inferred type and rank, and
each node's name (generated for unnamed nodes).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx
from onnx import TensorProto

from .io import elem_type_of, shape_of

__all__ = ["GraphIndex", "build_index", "fresh_name", "node_names"]

#: Element types a probe can watch: floats (integer ids and bool masks are refused).
_PROBE_DTYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE})


@dataclass
class GraphIndex:
    """Who produces and who consumes each tensor of the main graph, and their types."""

    graph: onnx.GraphProto
    names: list[str]
    types: dict[str, onnx.TypeProto]
    producer: dict[str, tuple[int, int]] = field(default_factory=dict)
    consumers: dict[str, set[int]] = field(default_factory=dict)
    constants: set[str] = field(default_factory=set)
    graph_inputs: list[str] = field(default_factory=list)
    graph_outputs: set[str] = field(default_factory=set)

    def rank(self, tensor: str) -> int | None:
        """Rank of ``tensor`` if shape inference found it."""
        shape = shape_of(self.types.get(tensor))
        return None if shape is None else len(shape)

    def is_data(self, tensor: str) -> bool:
        """Whether ``tensor`` is data (not constant) of known rank >= 1, of any element type."""
        return bool(tensor) and tensor not in self.constants and bool(self.rank(tensor))

    def probeable(self, tensor: str) -> bool:
        """Whether ``tensor`` is data (not constant) of a float type and known rank >= 1."""
        return self.is_data(tensor) and elem_type_of(self.types.get(tensor)) in _PROBE_DTYPES

    def dtype_name(self, tensor: str) -> str:
        """The element type of ``tensor`` in lower case (``"int64"``), or ``"unknown"``."""
        elem = elem_type_of(self.types.get(tensor))
        return TensorProto.DataType.Name(elem).lower() if elem else "unknown"

    def position(self, tensor: str) -> tuple[int, int]:
        """Topological position of ``tensor``: (producing node index, output index)."""
        if tensor in self.producer:
            return self.producer[tensor]
        return -1, self.graph_inputs.index(tensor)


def node_names(graph: onnx.GraphProto) -> list[str]:
    """Node names, with stable ``<op_type>_<index>`` names for unnamed nodes."""
    taken = {node.name for node in graph.node if node.name}
    names = []
    for i, node in enumerate(graph.node):
        name = node.name
        if not name:
            name = fresh_name(f"{node.op_type}_{i}", taken)
            taken.add(name)
        names.append(name)
    return names


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_<k>`` for the smallest k that is not in ``taken``."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def build_index(graph: onnx.GraphProto, types: dict[str, onnx.TypeProto]) -> GraphIndex:
    """Index ``graph`` (tensor producers, consumers, constants) with the tensor ``types``."""
    index = GraphIndex(graph, node_names(graph), types)
    initializers = {init.name for init in graph.initializer}
    index.constants |= initializers
    index.graph_inputs = [vi.name for vi in graph.input if vi.name not in initializers]
    index.graph_outputs = {vi.name for vi in graph.output}
    for i, node in enumerate(graph.node):
        for name in (*node.input, *_subgraph_inputs(node)):
            index.consumers.setdefault(name, set()).add(i)
        for k, name in enumerate(node.output):
            index.producer[name] = (i, k)
        if _is_constant_node(node, index.constants):
            index.constants.update(node.output)
    return index


def _is_constant_node(node: onnx.NodeProto, constants: set[str]) -> bool:
    """Whether the node's outputs are constants (a Constant, or computed only from constants)."""
    if node.op_type == "Constant":
        return True
    inputs = [name for name in node.input if name]
    has_subgraph = any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                       for attr in node.attribute)  # fmt: skip
    return bool(inputs) and not has_subgraph and all(name in constants for name in inputs)


def _subgraph_inputs(node: onnx.NodeProto) -> Iterator[str]:
    """Names used inside the node's subgraphs (If/Loop/Scan bodies may read outer tensors)."""
    for attr in node.attribute:
        for sub in (*([attr.g] if attr.type == onnx.AttributeProto.GRAPH else []), *attr.graphs):
            for inner in sub.node:
                yield from inner.input
                yield from _subgraph_inputs(inner)
