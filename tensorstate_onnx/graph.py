"""ONNX graph rewriting: choose the tensors to probe and expose them as graph outputs.

The rewriter is the bridge between "which layers does the user want to watch" and
"which tensors must onnxruntime hand back". It

* finds layers by ONNX op type, ONNX node name, or the framework names that
  survive export (PyTorch module names and classes, Keras layer names and classes),
* picks the tensor entering (``"before"``) or leaving (``"after"``) each match,
* works out the neuron (channel) axis of every probed tensor,
* appends each probed tensor to the graph outputs (typed by shape inference),
  optionally quantized and bit-packed inside the graph so that only bytes leave
  the session,

while leaving the caller's model untouched and the original outputs first and
unchanged. Models over 2 GB go through files with external data, because
protobuf cannot serialize them in one piece.
"""

from __future__ import annotations

import ast
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from .errors import ModelFileError, ProbeMatchError
from .patterns import as_patterns, matches_any, preview, probe_methods

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "needs_external_data",
    "Probe",
    "add_probes",
    "list_nodes",
    "load_model",
    "save_model",
]

#: Models whose serialized size exceeds this many bytes are shape-inferred, checked
#: and saved through files with external data. Protobuf's hard limit is 2 GiB; the
#: margin leaves room for the outputs and nodes the rewriter adds.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27

#: Valid values of ``method``.

#: Element types a probe can watch (what the packing engine accepts).
_PROBE_DTYPES = frozenset(
    {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BOOL}
)

#: First default-domain opset where ReduceSum takes its axes as an input.
_MIN_PACK_OPSET = 13

_TORCH_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
_TORCH_CLASS_HIERARCHY = "pkg.torch.onnx.class_hierarchy"
# Written by converters.from_keras: the Keras layer a node belongs to, its class, class path.
_KERAS_LAYER_NAME = "pkg.keras.layer_name"
_KERAS_LAYER_CLASS = "pkg.keras.layer_class"
_KERAS_LAYER_CLASS_PATH = "pkg.keras.layer_class_path"
#: Producers whose graph inputs are Keras/TensorFlow tensors, hence channels-last.
_CHANNELS_LAST_PRODUCERS = frozenset({"tf2onnx", "keras2onnx"})

# A PyTorch parameter or buffer name: "<module qualified name>.<attribute>".
_PARAM_NAME = re.compile(r"^([A-Za-z_]\w*(?:\.\w+)*)\.([A-Za-z_]\w*)$")
# The "_1" (or "_2", ...) that Keras 3 export appends to model and layer scopes.
_KERAS_SUFFIX = re.compile(r"_\d+$")

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


@dataclass(frozen=True)
class Probe:
    """One watched tensor of a rewritten model and how to read its neurons.

    ``output_name`` is the graph output that carries the tensor (or, when
    ``packed_in_graph``, its quantized and bit-packed bytes of shape
    ``(n_states, ceil(n_neurons / 8))``). ``shape`` is the probed tensor's own
    inferred shape, ``None`` for unknown or dynamic dimensions.
    """

    name: str
    label: str
    node_name: str
    op_type: str
    method: str
    tensor_name: str
    output_name: str
    channel_axis: int
    shape: tuple
    n_neurons: int | None
    packed_in_graph: bool


# --------------------------------------------------------------------------- files


def load_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """Return ``model`` as a ModelProto, reading and validating it if it is a path.

    A ModelProto is returned as is. A path is read together with the external data
    stored beside it and checked with ``onnx.checker``; every way a file can be
    wrong (missing, a directory, not ONNX, truncated, invalid) raises
    :class:`ModelFileError` with a hint on what to do.
    """
    if isinstance(model, onnx.ModelProto):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(
            f"model must be an onnx.ModelProto or a path to an .onnx file, "
            f"not {type(model).__name__}"
        )
    path = Path(model)
    _require_file(path)
    proto = _read_model(path)
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise ModelFileError(
            f"{path} is not a valid ONNX model ({_first_line(exc)}); re-export it "
            "or repair it so that onnx.checker.check_model accepts it"
        ) from exc
    return proto


def _require_file(path: Path) -> None:
    """Raise ModelFileError unless ``path`` names an existing regular file."""
    if not path.exists():
        raise ModelFileError(f"ONNX model file {path} does not exist; check the path")
    if path.is_dir():
        raise ModelFileError(
            f"{path} is a directory, not an ONNX file; pass the path of the .onnx "
            "file inside it"
        )


def _read_model(path: Path) -> onnx.ModelProto:
    """Parse ``path`` (and its external data) into a ModelProto or raise ModelFileError."""
    try:
        proto = onnx.load(str(path))
    except DecodeError as exc:
        raise ModelFileError(
            f"{path} could not be parsed as an ONNX model (corrupt, truncated or not "
            "ONNX at all); re-export or re-download it"
        ) from exc
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelFileError(
            f"{path} could not be read ({_first_line(exc)}); if the model keeps its "
            "weights in external data files, keep them beside the .onnx file"
        ) from exc
    if not proto.HasField("graph"):
        raise ModelFileError(
            f"{path} holds no ONNX graph; it is not an ONNX model file"
        )
    return proto


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None
) -> Path:
    """Write ``model`` to ``path`` and return the path, so onnxruntime can open it.

    ``external_data=None`` stores the weights in ``<file name>.data`` beside the
    model only when the model is over :data:`EXTERNAL_DATA_THRESHOLD` (protobuf
    cannot serialize more than 2 GiB); ``True``/``False`` force either way. The
    ModelProto keeps its weights in memory afterwards.
    """
    path = Path(path)
    if external_data is None:
        external_data = needs_external_data(model)
    if external_data:
        _save_with_external_data(model, path)
    else:
        onnx.save_model(model, str(path))
    return path


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model`` must go through files with external data (over :data:`EXTERNAL_DATA_THRESHOLD`)."""
    return model.ByteSize() > EXTERNAL_DATA_THRESHOLD


def _save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Save with weights in ``<name>.data`` beside ``path``, then reload them into ``model``.

    ``onnx.save_model`` strips the weights out of the proto it saves; reading them
    back keeps the caller's ModelProto usable.
    """
    location = path.name + ".data"
    # onnx appends to an existing data file, which would leave stale bytes behind.
    (path.parent / location).unlink(missing_ok=True)
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=location,
    )  # fmt: skip
    onnx.load_external_data_for_model(model, str(path.parent))


def _check_model(model: onnx.ModelProto) -> None:
    """Run ``onnx.checker`` on ``model``, through a temporary file when it is large."""
    if not needs_external_data(model):
        onnx.checker.check_model(model)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "model.onnx")
        _save_with_external_data(model, path)
        onnx.checker.check_model(str(path))


def _first_line(exc: BaseException) -> str:
    """The first line of an exception message, for embedding in our own messages."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------- shape inference


def _infer_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Map every tensor name with a known tensor type to that type.

    Shape inference runs with data propagation so that Reshape targets computed
    from shapes still give static dimensions. A model the inference cannot handle
    keeps whatever types it already declares (with a warning).
    """
    try:
        inferred = _run_shape_inference(model)
    except (onnx.shape_inference.InferenceError, RuntimeError, ValueError) as exc:
        warnings.warn(
            f"ONNX shape inference failed ({_first_line(exc)}); only the types the "
            "model declares are used",
            stacklevel=3,
        )
        inferred = model
    graph = inferred.graph
    types = {
        vi.name: vi.type
        for vi in (*graph.input, *graph.value_info, *graph.output)
        if vi.type.HasField("tensor_type")
    }
    for init in graph.initializer:
        types[init.name] = helper.make_tensor_type_proto(init.data_type, init.dims)
    return types


def _run_shape_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape-infer ``model`` in memory, or through temporary files when it is large."""
    if not needs_external_data(model):
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "model.onnx"), Path(tmp, "inferred.onnx")
        _save_with_external_data(model, src)
        onnx.shape_inference.infer_shapes_path(str(src), str(dst), data_prop=True)
        return onnx.load(str(dst), load_external_data=False)


def _shape_of(tensor_type: onnx.TypeProto | None) -> tuple | None:
    """Dimensions of a tensor type (None for unknown ones), or None if the rank is unknown."""
    if tensor_type is None or not tensor_type.tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else None
        for d in tensor_type.tensor_type.shape.dim
    )


def _elem_type(tensor_type: onnx.TypeProto | None) -> int:
    """Element type of a tensor type, 0 (UNDEFINED) when unknown."""
    return tensor_type.tensor_type.elem_type if tensor_type is not None else 0


# ------------------------------------------------------------------- graph index


@dataclass
class _Index:
    """Who produces and who consumes each tensor of the main graph, and their types."""

    graph: onnx.GraphProto
    names: list[str]
    types: dict[str, onnx.TypeProto]
    producer: dict[str, tuple[int, int]] = field(default_factory=dict)
    consumers: dict[str, set[int]] = field(default_factory=dict)
    constants: set[str] = field(default_factory=set)
    graph_inputs: list[str] = field(default_factory=list)
    graph_outputs: set[str] = field(default_factory=set)
    channels_last: bool = False

    def rank(self, tensor: str) -> int | None:
        """Rank of ``tensor`` if shape inference found it."""
        shape = _shape_of(self.types.get(tensor))
        return None if shape is None else len(shape)

    def probeable(self, tensor: str) -> bool:
        """Whether ``tensor`` is data (not constant) of a watchable dtype and known rank >= 1."""
        return (
            bool(tensor)
            and tensor not in self.constants
            and _elem_type(self.types.get(tensor)) in _PROBE_DTYPES
            and bool(self.rank(tensor))
        )

    def position(self, tensor: str) -> tuple[int, int]:
        """Topological position of ``tensor``: (producing node index, output index)."""
        if tensor in self.producer:
            return self.producer[tensor]
        return -1, self.graph_inputs.index(tensor)


def _node_names(graph: onnx.GraphProto) -> list[str]:
    """Node names, with stable ``<op_type>_<index>`` names for unnamed nodes."""
    taken = {node.name for node in graph.node if node.name}
    names = []
    for i, node in enumerate(graph.node):
        name = node.name
        if not name:
            name = _fresh_name(f"{node.op_type}_{i}", taken)
            taken.add(name)
        names.append(name)
    return names


def _fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_<k>`` for the smallest k that is not in ``taken``."""
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _build_index(model: onnx.ModelProto, types: dict[str, onnx.TypeProto]) -> _Index:
    """Index the main graph of ``model`` (tensor producers, consumers, constants)."""
    graph = model.graph
    index = _Index(graph, _node_names(graph), types, channels_last=_is_channels_last(model))
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


def _is_channels_last(model: onnx.ModelProto) -> bool:
    """Whether the model comes from Keras/TensorFlow (by its producer or from_keras's
    node metadata), whose inputs are channels-last even where its Convs compute NCHW."""
    return model.producer_name in _CHANNELS_LAST_PRODUCERS or any(
        prop.key == _KERAS_LAYER_NAME for node in model.graph.node for prop in node.metadata_props
    )


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


# ----------------------------------------------------------------------- scopes


@dataclass
class _Scope:
    """A group of nodes that one name stands for: a module, a layer or a single node.

    ``keys`` are the names a pattern is matched against; ``aliases`` are looser
    names (a Keras layer with or without the export's ``_1`` suffix) tried only
    when a pattern matches nothing else.
    """

    label: str
    keys: set[str]
    kind: str
    depth: int = 0
    aliases: set[str] = field(default_factory=set)
    nodes: list[int] = field(default_factory=list)

    def add(self, node: int) -> None:
        """Add a node index (nodes arrive in graph order, possibly repeated)."""
        if not self.nodes or self.nodes[-1] != node:
            self.nodes.append(node)


def _framework_scopes(graph: onnx.GraphProto) -> list[_Scope]:
    """Scopes of every module or layer name found in the node metadata and names."""
    scopes: dict[tuple, _Scope] = {}
    for i, node in enumerate(graph.node):
        for key, scope in _node_scope_entries(node):
            scopes.setdefault(key, scope).add(i)
    _add_parameter_scopes(graph, scopes)
    _alias_keras_suffixes([s for s in scopes.values() if s.kind == "keras"])
    return list(scopes.values())


def _node_scope_entries(node: onnx.NodeProto) -> list[tuple[tuple, _Scope]]:
    """(identity, fresh scope) of each framework scope ``node`` belongs to."""
    meta = {prop.key: prop.value for prop in node.metadata_props}
    if _TORCH_NAME_SCOPES in meta:
        return _torch_metadata_entries(meta)
    if _KERAS_LAYER_NAME in meta:
        return _keras_metadata_entries(meta, node.name)
    if node.name.startswith("/"):
        return _torch_legacy_entries(node.name)
    return _keras_entries(node.name)


def _torch_metadata_entries(meta: Mapping[str, str]) -> list[tuple[tuple, _Scope]]:
    """Modules of a node exported by the PyTorch dynamo exporter.

    ``pkg.torch.onnx.name_scopes`` is a Python list literal of qualified module
    names from the root (``''``) down, ending with the FX node name;
    ``pkg.torch.onnx.class_hierarchy`` lists the matching classes, ending with
    the aten op.
    """
    names = _literal_list(meta.get(_TORCH_NAME_SCOPES))
    classes = _literal_list(meta.get(_TORCH_CLASS_HIERARCHY))
    classes += [""] * (len(names) - len(classes))
    entries = []
    for depth in range(1, len(names) - 1):
        qualname, cls = names[depth], classes[depth]
        keys = {qualname, cls, cls.rsplit(".", 1)[-1]} - {""}
        entries.append((("torch", qualname), _Scope(qualname, keys, "torch", depth)))
    return entries


def _literal_list(text: str | None) -> list[str]:
    """Parse a metadata value such as ``"['', 'conv1', 'conv2d']"``; [] if malformed."""
    try:
        value = ast.literal_eval(text) if text else []
    except (ValueError, SyntaxError):
        return []
    return [str(item) for item in value] if isinstance(value, list) else []


def _torch_legacy_entries(name: str) -> list[tuple[tuple, _Scope]]:
    """Modules of a node named by the legacy TorchScript exporter (``/features/features.0/Conv``).

    Each path component is a module's qualified name from its last non-numeric
    atom on. So a component that extends the one before it is a container's child
    (``features`` -> ``features.0``; ``conv.0`` -> ``conv.0.0`` under
    ``features.1.conv.0``), any other is an attribute of its parent
    (``/blocks/blocks.0/conv/Conv`` is module ``blocks.0.conv``).
    """
    entries, parent, shown = [], "", ""
    for depth, part in enumerate(name.split("/")[1:-1], start=1):
        if not part:
            continue
        if parent and part.startswith(shown + "."):
            qualname = parent + part[len(shown):]
        else:
            qualname = f"{parent}.{part}" if parent else part
        entries.append((("torch", qualname), _Scope(qualname, {qualname}, "torch", depth)))
        parent, shown = qualname, part
    return entries


def _keras_metadata_entries(meta: Mapping[str, str], node_name: str) -> list[tuple[tuple, _Scope]]:
    """The Keras layer of a node tagged by ``converters.from_keras``.

    The layer name is the label (as on the native Keras path) and a key, with
    the class name (``"Conv2D"``) and class path, so patterns select the same
    layers as natively. The tf2onnx scope in the node name (``conv1_1``) stays
    an alias.
    """
    layer = meta[_KERAS_LAYER_NAME]
    keys = {layer, meta.get(_KERAS_LAYER_CLASS, ""), meta.get(_KERAS_LAYER_CLASS_PATH, "")} - {""}
    aliases = {scope.label for _, scope in _keras_entries(node_name)} - keys
    # Not kind "keras": the label is the layer's real name, no export suffix to strip.
    return [(("keras", layer), _Scope(layer, keys, "keras-metadata", 1, aliases))]


def _keras_entries(name: str) -> list[tuple[tuple, _Scope]]:
    """The Keras layer of a tf2onnx node name ``<model>/<layer>/<op...>``."""
    parts = [part for part in name.split("/") if part != "StatefulPartitionedCall"]
    if len(parts) < 3 or not parts[0] or not parts[1]:
        return []
    model_name, layer = parts[0], parts[1]
    return [(("keras", model_name, layer), _Scope(layer, {layer}, "keras", 1))]


def _add_parameter_scopes(graph: onnx.GraphProto, scopes: dict[tuple, _Scope]) -> None:
    """Recover modules that export optimizations erased from the metadata.

    The dynamo exporter folds BatchNorm into the preceding Conv and labels the
    fused node with the BatchNorm module only; the Conv module survives in the
    names of its parameters (``features.0.weight``). Only modules absent from
    every other scope are added, so tied weights do not merge layers.
    """
    known = {key[1] for key in scopes if key[0] == "torch"}
    initializers = {init.name for init in graph.initializer}
    for i, node in enumerate(graph.node):
        for name in node.input:
            match = _PARAM_NAME.match(name) if name in initializers else None
            if match and match.group(1) not in known:
                module = match.group(1)
                scopes.setdefault(("param", module), _Scope(module, {module}, "param")).add(i)


def _alias_keras_suffixes(scopes: list[_Scope]) -> None:
    """Let Keras layers match with and without the ``_<n>`` suffix export adds.

    Keras 3 ``model.export`` names every layer scope ``<layer>_1``. When all layer
    scopes carry such a suffix, the bare name is the layer's name (label and key)
    and the suffixed one an alias; otherwise the other way round.
    """
    all_suffixed = bool(scopes) and all(_KERAS_SUFFIX.search(s.label) for s in scopes)
    for scope in scopes:
        bare = _KERAS_SUFFIX.sub("", scope.label)
        if bare == scope.label:
            continue
        if all_suffixed:
            scope.aliases, scope.keys, scope.label = {scope.label}, {bare}, bare
        else:
            scope.aliases = {bare}


def _scopes_per_node(n_nodes: int, scopes: list[_Scope]) -> list[list[_Scope]]:
    """For each node, the scopes containing it, outermost first."""
    per_node: list[list[_Scope]] = [[] for _ in range(n_nodes)]
    for scope in scopes:
        for i in scope.nodes:
            per_node[i].append(scope)
    for entry in per_node:
        entry.sort(key=lambda s: (-len(s.nodes), s.depth))
    return per_node


# --------------------------------------------------------------------- matching


@dataclass
class _Matcher:
    """Resolves patterns to scopes: framework scopes or single nodes."""

    index: _Index
    scopes: list[_Scope]
    per_node: list[list[_Scope]]

    def node_label(self, i: int) -> str:
        """The most specific framework name of node ``i``, else its ONNX node name."""
        return self.per_node[i][-1].label if self.per_node[i] else self.index.names[i]

    def match(self, pattern: str) -> list[_Scope]:
        """Scopes that ``pattern`` names; aliases only when nothing else matches."""
        found = [s for s in self.scopes if matches_any([pattern], s.keys)]
        found += [
            _Scope(self.node_label(i), set(), "node", nodes=[i])
            for i, node in enumerate(self.index.graph.node)
            if matches_any([pattern], (node.op_type, self.index.names[i]))
        ]
        return found or [s for s in self.scopes if matches_any([pattern], s.aliases)]

    def no_match_message(self, patterns: Sequence[str]) -> str:
        """Explain that ``patterns`` matched nothing and list what the model offers."""
        graph = self.index.graph
        op_types = sorted({node.op_type for node in graph.node})
        framework = sorted({s.label for s in self.scopes})
        return (
            f"attach_to {list(patterns)} matched no op type, node or layer of the model. "
            f"Op types present: {', '.join(op_types) or '(none)'}. "
            f"Node names: {preview(self.index.names)}. "
            f"Framework names: {preview(framework)}. "
            "Patterns are case-sensitive and may use * and ? wildcards."
        )


def _select_scopes(
    matcher: _Matcher, attach_to: list[str], exclude: list[str]
) -> list[_Scope]:
    """Scopes matched by ``attach_to`` minus those lying inside an excluded scope."""
    if not attach_to:
        raise ProbeMatchError(
            "attach_to is empty; name at least one op type, node, module or layer"
        )
    chosen = [scope for pattern in attach_to for scope in matcher.match(pattern)]
    if not chosen:
        raise ProbeMatchError(matcher.no_match_message(attach_to))
    excluded: set[int] = set()
    for pattern in exclude:
        hits = matcher.match(pattern)
        if not hits:
            warnings.warn(f"exclude entry {pattern!r} matched nothing", UserWarning, stacklevel=3)
        excluded.update(i for scope in hits for i in scope.nodes)
    kept = [scope for scope in chosen if not set(scope.nodes) <= excluded]
    if not kept:
        raise ProbeMatchError(
            f"everything attach_to {attach_to} matched is excluded by exclude {exclude}"
        )
    return kept


# ------------------------------------------------------------- probed tensors


@dataclass(frozen=True)
class _Candidate:
    """A tensor chosen for probing, before naming and typing."""

    tensor: str
    label: str
    method: str
    node: int


def _after_tensor(scope: _Scope, index: _Index) -> tuple[int, str] | None:
    """(node, tensor) leaving ``scope``: a single node's first output, or the last
    scope output that is read outside the scope or is a graph output."""
    if len(scope.nodes) == 1:
        node = scope.nodes[0]
        first = index.graph.node[node].output[0]
        return (node, first) if index.probeable(first) else None
    members = set(scope.nodes)
    leaving = [
        (i, name)
        for i in scope.nodes
        for name in index.graph.node[i].output
        if index.probeable(name)
        and (index.consumers.get(name, set()) - members or name in index.graph_outputs)
    ]
    return leaving[-1] if leaving else None


def _before_tensor(scope: _Scope, index: _Index) -> tuple[int, str] | None:
    """(node, tensor) entering ``scope``: its first data input produced outside it."""
    members = set(scope.nodes)
    for i in scope.nodes:
        for name in index.graph.node[i].input:
            producer = index.producer.get(name, (-1, 0))[0]
            if producer not in members and index.probeable(name):
                return i, name
    return None


def _candidates(scopes: list[_Scope], method: str, index: _Index) -> list[_Candidate]:
    """One candidate per distinct (tensor, scope label, method), in topological order
    of the tensors.

    A tensor leaving one scope and entering the next (Conv -> Conv) is a candidate
    of each, as the native front ends record ``conv1:after`` and ``conv2:before``;
    a scope matched by several patterns is one candidate.
    """
    methods = probe_methods(method)
    finders = {"before": _before_tensor, "after": _after_tensor}
    found: dict[tuple[str, str, str], _Candidate] = {}
    for scope in scopes:
        for m in methods:
            hit = finders[m](scope, index)
            if hit is not None:
                node, tensor = hit
                found.setdefault((tensor, scope.label, m), _Candidate(tensor, scope.label, m, node))
    return sorted(found.values(), key=lambda c: (index.position(c.tensor), c.method))


def _unique_probe_names(candidates: list[_Candidate]) -> list[str]:
    """``<label>:<method>``, with ``#2``, ``#3``, ... on repeats."""
    names: list[str] = []
    for cand in candidates:
        base = f"{cand.label}:{cand.method}"
        name, k = base, 2
        while name in names:
            name, k = f"{base}#{k}", k + 1
        names.append(name)
    return names


# --------------------------------------------------------------- channel axes


def _channel_axes(index: _Index) -> dict[str, int]:
    """Neuron axis of every tensor, propagated through the graph in topological order.

    Axes are non-negative where the rank is known; ``-1`` stands for "last axis"
    of a tensor of unknown rank.
    """
    axes = {name: _graph_input_axis(name, index) for name in index.graph_inputs}
    for node in index.graph.node:
        for name in node.output:
            axes[name] = _normalize(_output_axis(node, axes, index), index.rank(name))
    return axes


def _normalize(axis: int, rank: int | None) -> int:
    """Make ``axis`` non-negative when the rank is known (last axis if out of range)."""
    if not rank:
        return axis
    return axis % rank if -rank <= axis < rank else rank - 1


def _graph_input_axis(name: str, index: _Index) -> int:
    """Axis 1 of image-like (rank >= 3) inputs, last otherwise.

    Inputs of Keras/TensorFlow models are channels-last (tf2onnx feeds a 1-channel
    NHWC image to a Reshape, a Dense layer reads any rank) unless only Conv-family
    ops read them (tf2onnx's ``inputs_as_nchw``). Elsewhere a rank >= 3 input that
    is only read by Transposes has its neurons on the axis the Transpose moves to 1.
    """
    rank = index.rank(name)
    if rank is None or rank < 3:
        return _normalize(-1, rank)
    if index.channels_last:
        return _normalize(_reader_axis(name, index), rank)
    readers = [index.graph.node[i] for i in sorted(index.consumers.get(name, ()))]
    perms = {tuple(_transpose_perm(node, rank)) for node in readers if node.op_type == "Transpose"}
    if readers and len(perms) == 1 and all(node.op_type == "Transpose" for node in readers):
        return perms.pop()[1]
    return 1


def _output_axis(node: onnx.NodeProto, axes: dict[str, int], index: _Index) -> int:
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


def _reader_axis(tensor: str, index: _Index) -> int:
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


def _apply_override(
    cand: _Candidate, probe_name: str, axis: int, rank: int, overrides: Mapping[str, int]
) -> int:
    """The caller's axis for this probe (by probe name, tensor name or label), normalized."""
    for key in (probe_name, cand.tensor, cand.label):
        if key in overrides:
            axis = overrides[key]
            if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool):
                raise TypeError(f"channel_axes[{key!r}] must be an int, got {axis!r}")
            if not -rank <= axis < rank:
                raise ValueError(
                    f"channel_axes[{key!r}] = {axis} is out of range for tensor "
                    f"{cand.tensor!r} of rank {rank}"
                )
            return int(axis) % rank
    return axis


def _check_override_keys(overrides: Mapping[str, int], probes: list[Probe]) -> None:
    """Reject channel_axes keys that name no probe (a silently ignored axis would miscount)."""
    known = {key for p in probes for key in (p.name, p.label, p.tensor_name)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"channel_axes keys {unknown} name no probe; use a probe name, label or "
            f"tensor name among: {preview(sorted(p.name for p in probes))}"
        )


# -------------------------------------------------------------- graph outputs


def _output_value_info(name: str, tensor_type: onnx.TypeProto) -> onnx.ValueInfoProto:
    """A graph output declaration for ``name``; anonymous dims get a dim_param."""
    dims = [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{name}_dim{k}")
        for k, d in enumerate(tensor_type.tensor_type.shape.dim)
    ]
    return helper.make_tensor_value_info(name, tensor_type.tensor_type.elem_type, dims)


# Ops whose output onnxruntime folds into a consumer from _FUSION_PARTNERS in a way
# that changes rounding (Conv+BatchNormalization, Conv+Add "sum" fusion, MatMul+Add
# into Gemm, ...). Exposing such an output as a graph output blocks the fusion, so
# the original outputs would differ in the last bits from the unprobed model.
_FUSIBLE_PRODUCERS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
_FUSION_PARTNERS = frozenset({"BatchNormalization", "Add", "Sum", "Sub", "Mul", "Div"})


@dataclass
class _Editor:
    """Appends nodes and initializers to a graph under names not used in it yet."""

    graph: onnx.GraphProto
    taken: set[str]
    ir_version: int
    initializers: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.initializers = {t.name: k for k, t in enumerate(self.graph.initializer)}

    def fresh(self, base: str) -> str:
        """A tensor or node name not used anywhere in the graph yet."""
        name = _fresh_name(base, self.taken)
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

    def isolate(self, tensor: str, index: _Index) -> str:
        """The tensor to expose for ``tensor``: itself, or the output of a duplicate of
        its producer when exposing it would block a rounding-changing ORT fusion.

        The duplicate reads the same inputs, so it computes the tensor exactly as the
        unfused graph does, while the original producer stays free to be fused.
        """
        if tensor in index.graph_outputs or tensor not in index.producer:
            return tensor
        node_index, position = index.producer[tensor]
        producer = index.graph.node[node_index]
        readers = index.consumers.get(tensor, ())
        fusible = producer.op_type in _FUSIBLE_PRODUCERS and any(
            index.graph.node[i].op_type in _FUSION_PARTNERS for i in readers
        )
        if not fusible:
            return tensor
        duplicate = onnx.NodeProto()
        duplicate.CopyFrom(producer)
        duplicate.name = self.fresh(f"{producer.name}__probe")
        duplicate.input[:] = [self._copy_initializer(name) for name in producer.input]
        duplicate.output[:] = [self.fresh(f"{o}__probe") if o else "" for o in producer.output]
        self.graph.node.append(duplicate)
        return duplicate.output[position]

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
        return self._add_initializer(copy)

    def pack(self, tensor: str, elem_type: int, rank: int, axis: int, n_neurons: int) -> str:
        """Append ops that quantize (``> 0``) and bit-pack ``tensor``; return the uint8 output.

        ``x > 0`` -> channels last -> ``(-1, C)`` -> zero-pad C to a multiple of 8 ->
        ``(-1, C/8, 8)`` -> weights 1, 2, ..., 128 summed per byte -> uint8. The sum
        runs in float32 (exact for 0..255) because every onnxruntime provider
        implements Mul and ReduceSum for it.
        """
        base = f"{tensor}__packed"
        fired = self._fired(tensor, elem_type, base)
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
        return self.node("Cast", [summed], base, to=TensorProto.UINT8)

    def _fired(self, tensor: str, elem_type: int, base: str) -> str:
        """Boolean ``tensor > 0`` (bool tensors are their own firing pattern)."""
        if elem_type == TensorProto.BOOL:
            return tensor
        if elem_type == TensorProto.FLOAT16:  # Greater has no float16 kernel on every provider
            tensor = self.node("Cast", [tensor], f"{base}_f32in", to=TensorProto.FLOAT)
            elem_type = TensorProto.FLOAT
        zero = self.const(f"{base}_zero", np.zeros((), helper.tensor_dtype_to_np_dtype(elem_type)))
        return self.node("Greater", [tensor, zero], f"{base}_fired")


def _all_names(graph: onnx.GraphProto, node_names: list[str]) -> set[str]:
    """Every node and tensor name of the main graph (to keep added names unique)."""
    names = set(node_names)
    names.update(vi.name for vi in (*graph.input, *graph.output, *graph.value_info))
    names.update(init.name for init in graph.initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
    return names


def _default_opset(model: onnx.ModelProto) -> int:
    """Version of the default ONNX domain the model imports."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


# ------------------------------------------------------------------ public API


def list_nodes(model: onnx.ModelProto | str | os.PathLike) -> list[dict]:
    """Describe every node of the main graph, for inspection (``tensorstate-onnx inspect``).

    Each entry has ``name`` (generated ``<op_type>_<index>`` for unnamed nodes),
    ``op_type``, ``labels`` (framework module/layer names containing the node,
    outermost first), ``inputs``, ``outputs`` and ``output_shapes`` (tuples with
    None for unknown dims, or None where even the rank is unknown).
    """
    model = load_model(model)
    types = _infer_types(model)
    names = _node_names(model.graph)
    per_node = _scopes_per_node(len(names), _framework_scopes(model.graph))
    return [
        {
            "name": names[i],
            "op_type": node.op_type,
            "labels": [scope.label for scope in per_node[i]],
            "inputs": list(node.input),
            "outputs": list(node.output),
            "output_shapes": [_shape_of(types.get(out)) for out in node.output],
        }
        for i, node in enumerate(model.graph.node)
    ]


def add_probes(
    model: onnx.ModelProto | str | os.PathLike,
    attach_to: str | Iterable[str],
    exclude: str | Iterable[str] = (),
    method: str = "after",
    channel_axes: Mapping[str, int] | None = None,
    pack_in_graph: bool = False,
) -> tuple[onnx.ModelProto, list[Probe]]:
    """Return a copy of ``model`` whose extra graph outputs expose the probed tensors.

    ``attach_to`` and ``exclude`` are patterns (case-sensitive, ``fnmatch``
    wildcards) for ONNX op types, node names, PyTorch module names or classes and
    Keras layer names; a framework name stands for all nodes of that module or
    layer. ``exclude`` wins. ``method`` picks the tensor entering (``"before"``),
    leaving (``"after"``) each match, or both. ``channel_axes`` overrides the
    inferred neuron axis, keyed by probe name, label or tensor name. With
    ``pack_in_graph`` the graph itself quantizes (``> 0``) and bit-packs each probe
    so only ``uint8[n_states, ceil(C/8)]`` leaves the session.

    The original outputs come first and are unchanged; the caller's model is not
    modified. Raises ProbeMatchError when nothing matches, ValueError for a bad
    method, axis or packing request.
    """
    probe_methods(method)
    patterns = as_patterns(attach_to, "attach_to")
    excluded = as_patterns(exclude, "exclude")
    work = _copy_model(model)
    if pack_in_graph and _default_opset(work) < _MIN_PACK_OPSET:
        raise ValueError(
            f"pack_in_graph needs default-domain opset >= {_MIN_PACK_OPSET}, the model "
            f"has {_default_opset(work)}; convert it with onnx.version_converter or "
            "use pack_in_graph=False"
        )
    index = _build_index(work, _infer_types(work))
    for node, name in zip(work.graph.node, index.names):
        node.name = name
    scopes = _framework_scopes(work.graph)
    matcher = _Matcher(index, scopes, _scopes_per_node(len(index.names), scopes))
    candidates = _candidates(_select_scopes(matcher, patterns, excluded), method, index)
    if not candidates:
        raise ProbeMatchError(
            f"attach_to {patterns} matched only constants or tensors that are not "
            "float/bool or have no inferred shape; nothing to probe"
        )
    probes = _make_probes(work, index, candidates, dict(channel_axes or {}), pack_in_graph)
    _check_model(work)
    return work, probes


def _copy_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """A private, checked copy of the model to rewrite (a file is read fresh, a proto copied).

    Checking the input first means a checker failure of the result is a rewriter
    bug, not a problem the caller brought in.
    """
    if not isinstance(model, onnx.ModelProto):
        return load_model(model)
    work = onnx.ModelProto()
    work.CopyFrom(model)
    try:
        _check_model(work)
    except onnx.checker.ValidationError as exc:
        raise ModelFileError(
            f"the model is not valid ONNX ({_first_line(exc)}); fix it so that "
            "onnx.checker.check_model accepts it"
        ) from exc
    return work


def _make_probes(
    model: onnx.ModelProto,
    index: _Index,
    candidates: list[_Candidate],
    overrides: dict[str, int],
    pack: bool,
) -> list[Probe]:
    """Turn candidates into Probes and add their graph outputs to ``model``.

    Each tensor becomes one graph output, shared by every probe that watches it
    (packed outputs are shared by probes with the same channel axis).
    """
    axes = _channel_axes(index)
    editor = _Editor(model.graph, _all_names(model.graph, index.names), model.ir_version)
    outputs: dict[tuple[str, int | None], str] = {}
    probes = []
    for cand, name in zip(candidates, _unique_probe_names(candidates)):
        shape = _shape_of(index.types[cand.tensor])
        axis = _apply_override(cand, name, axes[cand.tensor], len(shape), overrides)
        if pack and shape[axis] is None:
            raise ValueError(
                f"pack_in_graph needs the number of neurons of probe {name!r} (tensor "
                f"{cand.tensor!r}, axis {axis}) to be known statically; export the model "
                "with a fixed channel size or use pack_in_graph=False"
            )
        key = (cand.tensor, axis if pack else None)
        if key not in outputs:
            outputs[key] = _probe_output(model, index, editor, cand.tensor, axis, pack)
        node = index.graph.node[cand.node]
        probes.append(
            Probe(name, cand.label, node.name, node.op_type, cand.method, cand.tensor,
                  outputs[key], axis, shape, shape[axis], pack)
        )  # fmt: skip
    _check_override_keys(overrides, probes)
    return probes


def _probe_output(
    model: onnx.ModelProto, index: _Index, editor: _Editor, tensor: str, axis: int, pack: bool
) -> str:
    """Add the graph output that carries ``tensor`` (packed on ``axis`` if ``pack``); return it."""
    tensor_type = index.types[tensor]
    source = editor.isolate(tensor, index)
    if pack:
        return _expose_packed(model, editor, source, tensor_type, axis)
    return _expose(model, index, source, tensor_type)


def _expose(
    model: onnx.ModelProto, index: _Index, source: str, tensor_type: onnx.TypeProto
) -> str:
    """Make ``source`` a graph output (unless it already is one); return the output name."""
    if source not in index.graph_outputs:
        model.graph.output.append(_output_value_info(source, tensor_type))
        index.graph_outputs.add(source)
    return source


def _expose_packed(
    model: onnx.ModelProto, editor: _Editor, source: str, tensor_type: onnx.TypeProto, axis: int
) -> str:
    """Add the packing ops for ``source`` and their uint8 graph output; return its name."""
    shape = _shape_of(tensor_type)
    n_neurons = shape[axis]
    packed = editor.pack(source, _elem_type(tensor_type), len(shape), axis, n_neurons)
    others = [d for k, d in enumerate(shape) if k != axis]
    n_states = int(np.prod(others)) if None not in others else f"{packed}_states"
    model.graph.output.append(
        helper.make_tensor_value_info(packed, TensorProto.UINT8, [n_states, -(-n_neurons // 8)])
    )
    return packed
