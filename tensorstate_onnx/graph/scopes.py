"""Framework scopes: which nodes a PyTorch module, a Keras layer or a pattern stands for.

Exported graphs keep the framework's names in three ways, all read here:

* node metadata (:mod:`~tensorstate_onnx.graph.metadata`): the PyTorch dynamo
  exporter's module names and classes, ``from_keras``'s Keras layers;
* node names: the legacy PyTorch exporter's ``/features/features.0/Conv`` and
  tf2onnx's ``<model>/<layer>/<op>``;
* parameter names (``features.0.weight``) of modules the exporter's
  optimizations erased from the metadata.

A :class:`Matcher` resolves ``attach_to``/``exclude`` patterns to these scopes
or to single nodes (by op type or node name), and :func:`after_tensor` /
:func:`before_tensor` give the tensor leaving or entering a scope.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import onnx

from ..errors import ProbeMatchError
from ..patterns import matches_any, preview
from .index import GraphIndex
from .metadata import (
    KERAS_LAYER_CLASS,
    KERAS_LAYER_CLASS_PATH,
    KERAS_LAYER_NAME,
    TORCH_CLASS_HIERARCHY,
    TORCH_NAME_SCOPES,
    parse_list,
)

__all__ = [
    "Matcher",
    "Scope",
    "after_tensor",
    "before_tensor",
    "framework_scopes",
    "scopes_per_node",
    "select_scopes",
    "split_calls",
]

# A PyTorch parameter or buffer name: "<module qualified name>.<attribute>".
_PARAM_NAME = re.compile(r"^([A-Za-z_]\w*(?:\.\w+)*)\.([A-Za-z_]\w*)$")
# The "_1" (or "_2", ...) that Keras 3 export appends to model and layer scopes.
_KERAS_SUFFIX = re.compile(r"_\d+$")


# ----------------------------------------------------------------------- scopes


@dataclass
class Scope:
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


def framework_scopes(graph: onnx.GraphProto) -> list[Scope]:
    """Scopes of every module or layer name found in the node metadata and names."""
    scopes: dict[tuple, Scope] = {}
    per_node: list[set[tuple]] = []
    for i, node in enumerate(graph.node):
        entries = _node_scope_entries(node)
        per_node.append({key for key, _ in entries if key[0] == "torch"})
        for key, scope in entries:
            scopes.setdefault(key, scope).add(i)
    _adopt_unscoped_nodes(graph, scopes, per_node)
    _add_parameter_scopes(graph, scopes)
    _alias_keras_suffixes([s for s in scopes.values() if s.kind == "keras"])
    root = _torch_root_scope(graph)
    return list(scopes.values()) + ([root] if root is not None else [])


def _adopt_unscoped_nodes(graph: onnx.GraphProto, scopes: dict[tuple, Scope], per_node: list[set[tuple]]) -> None:
    """Put the nodes the exporter left without module metadata into the modules that
    both the producers of their inputs and the readers of their outputs belong to, a
    connected group of such nodes at a time: the dynamo exporter's Split of GPT-2's
    fused query/key/value projection and the legacy exporter's Shape ->
    ConstantOfShape -> ScatterND chain of Swin's window mask have none, and without
    them a module's tensors would seem to leave it and come back (several calls).
    In a graph with the dynamo exporter's metadata, a group also joins the modules
    that read it."""
    producer = {name: i for i, node in enumerate(graph.node) for name in node.output if name}
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            readers.setdefault(name, []).append(i)
    # Nodes named with a module path (``/features/Relu``; ``/Relu`` is the root's own) or
    # given module metadata (the root's own ops have scopes ``['', op]``) have a scope.
    with_metadata = [any(prop.key == TORCH_NAME_SCOPES for prop in node.metadata_props) for node in graph.node]
    placed = [node.name.startswith("/") or meta for node, meta in zip(graph.node, with_metadata)]
    exported_with_metadata = any(with_metadata)
    unscoped = [i for i in range(len(graph.node)) if not per_node[i] and not placed[i]]
    group = {i: i for i in unscoped}

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i in unscoped:
        for name in graph.node[i].output:
            for j in readers.get(name, ()):
                if j in group:
                    group[root(j)] = root(i)
    members: dict[int, list[int]] = {}
    for i in unscoped:
        members.setdefault(root(i), []).append(i)
    for nodes in members.values():
        inside = set(nodes)
        before = [
            per_node[producer[name]] for i in nodes for name in graph.node[i].input
            if name in producer and producer[name] not in inside
        ]  # fmt: skip
        after = [
            per_node[j] for i in nodes for name in graph.node[i].output
            for j in readers.get(name, ()) if j not in inside
        ]  # fmt: skip
        if not before or not after:
            continue
        common = set.intersection(*before, *after)
        if exported_with_metadata:
            # The dynamo exporter gives ops in a module's own forward its scope, so a node
            # it left without one between two modules (the Split of ShuffleNet's
            # ``x.chunk(2, 1)``) begins the module that reads it, besides belonging to
            # the modules around both (the stage both blocks are in).
            common |= set.intersection(*after)
        for key in common:
            scope_nodes = scopes[key].nodes
            scope_nodes.extend(i for i in nodes if i not in scope_nodes)
            scope_nodes.sort()


def _torch_root_scope(graph: onnx.GraphProto) -> Scope | None:
    """The exported PyTorch module itself, as natively ``attach_to`` can name the root
    (``"TransformerEncoderLayer"`` on a bare layer): every node of the graph, named
    by its class like the native probe. Kind ``"torch-root"``: it reads the graph
    inputs and writes the graph outputs, and is nobody's label."""
    for node in graph.node:
        meta = {prop.key: prop.value for prop in node.metadata_props}
        if TORCH_NAME_SCOPES not in meta:
            continue
        names, classes = parse_list(meta[TORCH_NAME_SCOPES]), parse_list(meta.get(TORCH_CLASS_HIERARCHY))
        if not names or names[0] != "" or not classes or not classes[0]:
            continue
        full = classes[0]
        short = full.rsplit(".", 1)[-1]
        return Scope(short, {short, full}, "torch-root", 0, nodes=list(range(len(graph.node))))
    return None


def _node_scope_entries(node: onnx.NodeProto) -> list[tuple[tuple, Scope]]:
    """(identity, fresh scope) of each framework scope ``node`` belongs to."""
    meta = {prop.key: prop.value for prop in node.metadata_props}
    if TORCH_NAME_SCOPES in meta:
        return _torch_metadata_entries(meta)
    if KERAS_LAYER_NAME in meta:
        return _keras_metadata_entries(meta, node.name)
    if node.name.startswith("/"):
        return _torch_legacy_entries(node.name)
    return _keras_entries(node.name)


def _torch_metadata_entries(meta: Mapping[str, str]) -> list[tuple[tuple, Scope]]:
    """Modules of a node exported by the PyTorch dynamo exporter.

    ``pkg.torch.onnx.name_scopes`` is a Python list literal of qualified module
    names from the root (``''``) down, ending with the FX node name;
    ``pkg.torch.onnx.class_hierarchy`` lists the matching classes, ending with
    the aten op.
    """
    names = parse_list(meta.get(TORCH_NAME_SCOPES))
    classes = parse_list(meta.get(TORCH_CLASS_HIERARCHY))
    classes += [""] * (len(names) - len(classes))
    entries = []
    for depth in range(1, len(names) - 1):
        qualname, cls = names[depth], classes[depth]
        keys = {qualname, cls, cls.rsplit(".", 1)[-1]} - {""}
        entries.append((("torch", qualname), Scope(qualname, keys, "torch", depth)))
    return entries


def _torch_legacy_entries(name: str) -> list[tuple[tuple, Scope]]:
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
        entries.append((("torch", qualname), Scope(qualname, {qualname}, "torch", depth)))
        parent, shown = qualname, part
    return entries


def _keras_metadata_entries(meta: Mapping[str, str], node_name: str) -> list[tuple[tuple, Scope]]:
    """The Keras layer of a node tagged by ``converters.from_keras``.

    The layer name is the label (as on the native Keras path) and a key, with
    the class name (``"Conv2D"``) and class path, so patterns select the same
    layers as natively. The tf2onnx scope in the node name (``conv1_1``) stays
    an alias.
    """
    layer = meta[KERAS_LAYER_NAME]
    keys = {layer, meta.get(KERAS_LAYER_CLASS, ""), meta.get(KERAS_LAYER_CLASS_PATH, "")} - {""}
    aliases = {scope.label for _, scope in _keras_entries(node_name)} - keys
    # Not kind "keras": the label is the layer's real name, no export suffix to strip.
    return [(("keras", layer), Scope(layer, keys, "keras-metadata", 1, aliases))]


def _keras_entries(name: str) -> list[tuple[tuple, Scope]]:
    """The Keras layer of a tf2onnx node name ``<model>/<layer>/<op...>``."""
    parts = [part for part in name.split("/") if part != "StatefulPartitionedCall"]
    if len(parts) < 3 or not parts[0] or not parts[1]:
        return []
    model_name, layer = parts[0], parts[1]
    return [(("keras", model_name, layer), Scope(layer, {layer}, "keras", 1))]


def _add_parameter_scopes(graph: onnx.GraphProto, scopes: dict[tuple, Scope]) -> None:
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
                scopes.setdefault(("param", module), Scope(module, {module}, "param")).add(i)


def _alias_keras_suffixes(scopes: list[Scope]) -> None:
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


def scopes_per_node(n_nodes: int, scopes: list[Scope]) -> list[list[Scope]]:
    """For each node, the scopes containing it, outermost first."""
    per_node: list[list[Scope]] = [[] for _ in range(n_nodes)]
    for scope in scopes:
        if scope.kind == "torch-root":
            continue  # contains everything, labels nothing
        for i in scope.nodes:
            per_node[i].append(scope)
    for entry in per_node:
        entry.sort(key=lambda s: (-len(s.nodes), s.depth))
    return per_node


# --------------------------------------------------------------------- matching


@dataclass
class Matcher:
    """Resolves patterns to scopes: framework scopes or single nodes."""

    index: GraphIndex
    scopes: list[Scope]
    per_node: list[list[Scope]]
    _same_op: dict[tuple[int, str], list[int]] = field(init=False, repr=False)
    _calls: dict[int, list[Scope]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._calls = {}  # split_calls of each module probe_label looked at, by id
        # The nodes of each (most specific scope, op type), in graph order.
        self._same_op = {}
        for i, node in enumerate(self.index.graph.node):
            if self.per_node[i]:
                self._same_op.setdefault((id(self.per_node[i][-1]), node.op_type), []).append(i)

    def node_label(self, i: int) -> str:
        """The label of a probe on node ``i`` alone (matched by op type or node name)
        that says which tensor it watches.

        Inside a module or layer (its most specific one) it is
        ``<module>/<op type>``, plus ``#k`` when the module has several nodes of
        that type (the k-th in graph order, from 1): ``transformer.h.0.attn/MatMul#2``.
        A node outside every module keeps its ONNX node name. (A node whose tensor
        is the module's own is named after the module: :meth:`probe_label`.)
        """
        if not self.per_node[i]:
            return self.index.names[i]
        module = self.per_node[i][-1]
        op = self.index.graph.node[i].op_type
        same = self._same_op[(id(module), op)]
        return f"{module.label}/{op}" + (f"#{same.index(i) + 1}" if len(same) > 1 else "")

    def probe_label(self, scope: Scope, method: str, tensor: str) -> str:
        """The label of a probe on ``tensor``, found as ``scope``'s ``method`` tensor.

        A single node whose tensor is also its module's own tensor for ``method``
        (the one a probe of the module watches: the Conv of a Conv2d, the Relu
        ending a Keras Dense layer) is named after the module, so one name always
        means one tensor on every path; other scopes keep their label.
        """
        if scope.kind not in ("op", "node") or not self.per_node[scope.nodes[0]]:
            return scope.label
        module = self.per_node[scope.nodes[0]][-1]
        finder = after_tensor if method == "after" else before_tensor
        if id(module) not in self._calls:
            self._calls[id(module)] = split_calls(module, self.index)
        for call in self._calls[id(module)]:
            hit = finder(call, self.index) if scope.nodes[0] in call.nodes else None
            if hit is not None and hit[1] == tensor:
                return module.label
        return scope.label

    def match(self, pattern: str, warn: bool = False) -> list[Scope]:
        """Scopes that ``pattern`` names; aliases only when nothing else matches.

        A framework name wins over an ONNX op type (DESIGN §1): when ``pattern``
        names modules or layers (``"LSTM"``, ``"Add"``), nodes it matches only by
        op type are left out; with ``warn``, those outside the chosen modules are
        reported. Nodes matched by op type are of kind ``"op"`` (a pattern for many
        tensors of any element type), by node name alone of kind ``"node"``.
        """
        framework = [s for s in self.scopes if matches_any([pattern], s.keys)]
        found, dropped = list(framework), []
        for i, node in enumerate(self.index.graph.node):
            by_op = matches_any([pattern], (node.op_type,))
            by_name = matches_any([pattern], (self.index.names[i],))
            if by_op and not by_name and framework:
                dropped.append(i)
            elif by_op or by_name:
                found.append(Scope(self.node_label(i), set(), "op" if by_op else "node", nodes=[i]))
        if warn and dropped:
            inside = {i for scope in framework for i in scope.nodes}
            outside = [i for i in dropped if i not in inside]
            if outside:
                warnings.warn(
                    f"attach_to {pattern!r} names framework modules or layers "
                    f"({preview(sorted({s.label for s in framework}))}) and is also an ONNX op type; "
                    f"the modules or layers are probed, not the {len(outside)} {pattern} node(s) "
                    f"outside them ({preview([self.index.names[i] for i in outside])}); name those "
                    "nodes to probe them",
                    UserWarning,
                    stacklevel=4,
                )
        return found or [s for s in self.scopes if matches_any([pattern], s.aliases)]

    def no_match_message(self, patterns: Sequence[str]) -> str:
        """Explain that ``patterns`` matched nothing and list what the model offers."""
        graph = self.index.graph
        op_types = sorted({node.op_type for node in graph.node})
        framework = sorted({s.label for s in self.scopes})
        inner = [
            f"{node.op_type} {node.name or '(unnamed)'} in the body of {owner.op_type} {owner.name or '(unnamed)'}"
            for owner, node in subgraph_nodes(graph)
            if matches_any(list(patterns), (node.op_type, node.name))
        ]
        control_flow = (
            f" Matches inside control-flow subgraphs cannot be probed (a body runs many times per "
            f"sample and its tensors are not graph outputs): {preview(inner)}; probe the outputs of "
            "the control-flow node instead."
            if inner
            else ""
        )
        return (
            f"attach_to {list(patterns)} matched no op type, node or layer of the model.{control_flow} "
            f"Op types present: {', '.join(op_types) or '(none)'}. "
            f"Node names: {preview(self.index.names)}. "
            f"Framework names: {preview(framework)}. "
            "Patterns are case-sensitive and may use * and ? wildcards."
        )


def subgraph_nodes(graph: onnx.GraphProto) -> Iterator[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """``(control-flow node, node)`` for every node inside the subgraphs (Loop,
    If and Scan bodies) of ``graph``, at any depth; the owner is the top-level node."""
    for owner in graph.node:
        stack = _bodies(owner)
        while stack:
            for node in stack.pop().node:
                yield owner, node
                stack += _bodies(node)


def _bodies(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs held in the attributes of ``node``."""
    return [body for a in node.attribute for body in ([a.g] if a.HasField("g") else []) + list(a.graphs)]


def select_scopes(
    matcher: Matcher, attach_to: list[str], exclude: list[str]
) -> list[Scope]:
    """Scopes matched by ``attach_to`` minus the excluded ones: a module or layer
    only when an ``exclude`` entry names it (not its parent: the same as the
    native front ends), an ONNX node also when it lies inside an excluded scope."""
    if not attach_to:
        raise ProbeMatchError(
            "attach_to is empty; name at least one op type, node, module or layer"
        )
    matched = {pattern: matcher.match(pattern, warn=True) for pattern in attach_to}
    chosen = [scope for pattern in attach_to for scope in matched[pattern]]
    if not chosen:
        raise ProbeMatchError(matcher.no_match_message(attach_to))
    missing = [pattern for pattern in attach_to if not matched[pattern]]
    if missing:
        warnings.warn(
            f"attach_to entries {missing} matched nothing in the ONNX graph; a module or layer that "
            "exports to no node (Dropout or Identity at inference) has no tensor of its own there: "
            "probe the layer it passes through instead",
            UserWarning,
            stacklevel=3,
        )
    excluded: set[int] = set()
    named: set[tuple[str, tuple[int, ...]]] = set()
    for pattern in exclude:
        hits = matcher.match(pattern)
        if not hits:
            warnings.warn(f"exclude entry {pattern!r} matched nothing", UserWarning, stacklevel=3)
        excluded.update(i for scope in hits for i in scope.nodes)
        named.update((scope.label, tuple(scope.nodes)) for scope in hits)
    kept = [
        scope for scope in chosen
        if (scope.label, tuple(scope.nodes)) not in named
        and not (scope.kind in ("op", "node") and set(scope.nodes) <= excluded)
    ]  # fmt: skip
    if not kept:
        raise ProbeMatchError(
            f"everything attach_to {attach_to} matched is excluded by exclude {exclude}"
        )
    return kept


# ------------------------------------------------------------------------ calls


def split_calls(scope: Scope, index: GraphIndex) -> list[Scope]:
    """The calls of a PyTorch module that ran several times in one forward pass
    (torchvision's ``BasicBlock.relu``), one scope each; ``[scope]`` otherwise.

    The exporter lays out a module call's nodes one after the other. A new call
    starts where nodes outside the module between two of its nodes read what
    the module computed so far (its output went on through the network and came
    back). Calls that nothing separates (one module applied to two parallel
    branches, node after node) stay one scope.
    """
    if scope.kind != "torch" or len(scope.nodes) < 2:
        return [scope]
    members = sorted(set(scope.nodes))
    runs: list[list[int]] = [[members[0]]]
    for previous, current in zip(members, members[1:]):
        produced = {name for i in runs[-1] for name in index.graph.node[i].output}
        gap = range(previous + 1, current)
        if any(name in produced for i in gap for name in index.graph.node[i].input):
            runs.append([])
        runs[-1].append(current)
    if len(runs) == 1:
        return [scope]
    return [Scope(scope.label, scope.keys, scope.kind, scope.depth, scope.aliases, run) for run in runs]


# ------------------------------------------------------------------- boundaries


def after_tensor(scope: Scope, index: GraphIndex) -> tuple[int, str] | None:
    """(node, tensor) leaving ``scope``: a single node's first output, or the last
    scope output that is read outside the scope or is a graph output.

    A float tensor is preferred; a non-float one is returned only when no float
    tensor leaves (for the caller to refuse).
    """
    if scope.kind == "torch-root":  # the module's first output, as natively
        outputs = [o.name for o in index.graph.output if o.name in index.producer and index.is_data(o.name)]
        floats = [name for name in outputs if index.probeable(name)]
        chosen = (floats or outputs)[:1]
        return (index.producer[chosen[0]][0], chosen[0]) if chosen else None
    if len(scope.nodes) == 1:
        node = scope.nodes[0]
        first = index.graph.node[node].output[0]
        return (node, first) if index.is_data(first) else None
    members = set(scope.nodes)
    leaving = [
        (i, name)
        for i in scope.nodes
        for name in index.graph.node[i].output
        if index.is_data(name)
        and (index.consumers.get(name, set()) - members or name in index.graph_outputs)
    ]
    floats = [hit for hit in leaving if index.probeable(hit[1])]
    return (floats or leaving)[-1] if leaving else None


def before_tensor(scope: Scope, index: GraphIndex) -> tuple[int, str] | None:
    """(node, tensor) entering ``scope``: its first data input produced outside it.

    A float tensor is preferred; a non-float one is returned only when no float
    tensor enters (for the caller to refuse).
    """
    if scope.kind == "torch-root":  # the module's first input, as natively
        inputs = [name for name in index.graph_inputs if index.is_data(name) and index.consumers.get(name)]
        floats = [name for name in inputs if index.probeable(name)]
        chosen = (floats or inputs)[:1]
        return (min(index.consumers[chosen[0]]), chosen[0]) if chosen else None
    members = set(scope.nodes)
    entering = [
        (i, name)
        for i in scope.nodes
        for name in index.graph.node[i].input
        if index.producer.get(name, (-1, 0))[0] not in members and index.is_data(name)
    ]
    floats = [hit for hit in entering if index.probeable(hit[1])]
    return (floats or entering)[0] if entering else None

