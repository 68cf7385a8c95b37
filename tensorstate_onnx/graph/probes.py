"""Probes: choose the tensors to watch and expose them as outputs of a model copy.

:func:`add_probes` ties the rewriter together: it reads the model
(:mod:`~tensorstate_onnx.graph.io`), indexes it, resolves the patterns to
framework scopes (:mod:`~tensorstate_onnx.graph.scopes`), picks the tensor
entering or leaving each match, works out its neuron axis
(:mod:`~tensorstate_onnx.graph.layout`) and adds its graph output
(:mod:`~tensorstate_onnx.graph.editor`). :func:`list_nodes` describes a model's
nodes with the same names and scopes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import onnx

from ..axes import check_override_keys, checked_override, dtype_error, warn_guessed
from ..errors import ModelFileError, OptionError, ProbeMatchError, first_line
from ..patterns import as_patterns, probe_methods
from .editor import MIN_PACK_OPSET, Editor, all_names, default_opset
from .index import GraphIndex, build_index
from .io import check_model, infer_types, load_model, shape_of
from .layout import CHANNEL_READERS, Layout, infer_channel_axes, is_channels_last
from .scopes import (
    Matcher,
    Scope,
    after_tensor,
    before_tensor,
    framework_scopes,
    scopes_per_node,
    select_scopes,
    split_calls,
)

__all__ = ["Probe", "add_probes", "list_nodes"]


@dataclass(frozen=True)
class Probe:
    """One watched tensor of a rewritten model and how to read its neurons.

    ``output_name`` is the graph output that carries the tensor: its firing
    pattern ``tensor > 0`` (bool, same shape) for float32/float64 tensors, the
    tensor itself otherwise, or, when ``packed_in_graph``, its quantized and
    bit-packed bytes of shape ``(n_states, ceil(n_neurons / 8))``. ``shape`` is
    the probed tensor's own inferred shape, ``None`` for unknown or dynamic
    dimensions. ``channel_axis`` is the neuron axis (1 for a rank-1 tensor: one
    neuron per sample, the ``[N, 1]`` view); ``axis_guessed`` says no rule gave
    it (a warning was issued).

    A PyTorch module called several times in one forward pass is one probe that
    records every call: ``calls`` holds a Probe (same name) for each call after
    the first, whose tensors are recorded after this one's, batch by batch
    (:meth:`each_call` gives them all).
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
    axis_guessed: bool = False
    calls: tuple["Probe", ...] = ()
    #: With ``packed_in_graph``, the graph output holding the probed tensor's shape
    #: (rank >= 3), from which its rows are put in batch order; else None.
    shape_output: str | None = None

    def each_call(self) -> tuple["Probe", ...]:
        """This probe and the probes of its later calls, in call order."""
        return (self, *self.calls)


@dataclass(frozen=True)
class _Candidate:
    """A tensor chosen for probing, before naming and typing."""

    tensor: str
    label: str
    method: str
    node: int
    group: int | None = None  # candidates of one group are the calls of one module


def list_nodes(model: onnx.ModelProto | str | os.PathLike) -> list[dict]:
    """Describe every node of the main graph, for inspection (``tensorstate-onnx inspect``).

    Each entry has ``name`` (generated ``<op_type>_<index>`` for unnamed nodes),
    ``op_type``, ``labels`` (framework module/layer names containing the node,
    outermost first), ``inputs``, ``outputs``, ``output_shapes`` (tuples with
    None for unknown dims, or None where even the rank is unknown),
    ``channel_axes`` (the neuron axis of each output a probe could watch, None
    for constants and tensors that are not float or of unknown rank) and
    ``axes_guessed`` (whether that axis is a guess) and ``probeable`` (whether
    the output is worth a probe: a float activation with a neuron axis, not
    shape arithmetic, i.e. computed only from ``Shape``/``Size`` outputs and
    constants).
    """
    model = load_model(model)
    types = infer_types(model)
    index = build_index(model.graph, types)
    names = index.names
    per_node = scopes_per_node(len(names), framework_scopes(model.graph))
    layout = infer_channel_axes(index, is_channels_last(model))
    shape_math = _shape_arithmetic(model.graph, index.constants)
    return [
        {
            "name": names[i],
            "op_type": node.op_type,
            "labels": [scope.label for scope in per_node[i]],
            "inputs": list(node.input),
            "outputs": list(node.output),
            "output_shapes": [shape_of(types.get(out)) for out in node.output],
            "channel_axes": [layout.axes.get(out) if index.probeable(out) else None for out in node.output],
            "axes_guessed": [index.probeable(out) and out in layout.guessed for out in node.output],
            "probeable": [
                index.probeable(out) and layout.axes.get(out) is not None and out not in shape_math
                for out in node.output
            ],
        }
        for i, node in enumerate(model.graph.node)
    ]


def _shape_arithmetic(graph: onnx.GraphProto, constants: set[str]) -> set[str]:
    """Tensors computed from the shapes of others: outputs of ``Shape``/``Size`` and of
    nodes whose every non-constant input is such a tensor (a Resize's scales, a
    Reshape's target computed in float)."""
    derived: set[str] = set()
    for node in graph.node:
        inputs = [name for name in node.input if name and name not in constants]
        if node.op_type in ("Shape", "Size") or (inputs and all(name in derived for name in inputs)):
            derived.update(name for name in node.output if name)
    return derived


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
    leaving (``"after"``) each match, or both. Each probe's neuron axis follows
    :mod:`~tensorstate_onnx.graph.layout`; ``channel_axes`` overrides it, keyed by
    probe name, label or tensor name. With
    ``pack_in_graph`` the graph itself quantizes (``> 0``) and bit-packs each probe
    so only ``uint8[n_states, ceil(C/8)]`` leaves the session.

    The original outputs come first and are unchanged; the caller's model is not
    modified. Raises ProbeMatchError when nothing matches, ProbeDtypeError when a
    named layer or node would be probed on an integer or bool tensor (tensors of
    ops matched by op type are skipped when they are not float), ChannelAxisError
    for an override naming no probe or an axis out of range, ValueError for a bad
    method or packing request. A probe whose axis is a guess warns
    (GuessedAxisWarning).
    """
    return probe_in_place(owned_copy(model), attach_to, exclude, method, channel_axes, pack_in_graph)


def probe_in_place(
    work: onnx.ModelProto,
    attach_to: str | Iterable[str],
    exclude: str | Iterable[str] = (),
    method: str = "after",
    channel_axes: Mapping[str, int] | None = None,
    pack_in_graph: bool = False,
) -> tuple[onnx.ModelProto, list[Probe]]:
    """:func:`add_probes` on a model the caller owns (from :func:`owned_copy`), which
    is rewritten in place and returned: no second copy of a large model's weights."""
    probe_methods(method)
    patterns = as_patterns(attach_to, "attach_to")
    excluded = as_patterns(exclude, "exclude")
    if pack_in_graph and default_opset(work) < MIN_PACK_OPSET:
        raise OptionError(
            f"pack_in_graph needs default-domain opset >= {MIN_PACK_OPSET}, the model "
            f"has {default_opset(work)}; convert it with onnx.version_converter or "
            "use pack_in_graph=False"
        )
    index = build_index(work.graph, infer_types(work))
    for node, name in zip(work.graph.node, index.names):
        node.name = name
    scopes = framework_scopes(work.graph)
    matcher = Matcher(index, scopes, scopes_per_node(len(index.names), scopes))
    candidates, skipped = _candidates(select_scopes(matcher, patterns, excluded), method, matcher)
    if not candidates and skipped:
        raise dtype_error(skipped[0][0], index.dtype_name(skipped[0][1]))
    if not candidates:
        raise ProbeMatchError(
            f"attach_to {patterns} matched only constants or tensors that have no "
            "inferred shape; nothing to probe"
        )
    probes = _make_probes(work, index, candidates, dict(channel_axes or {}), pack_in_graph)
    check_model(work, weights=False)  # the weights were checked by owned_copy; probes only copy them
    return work, probes


def owned_copy(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """A private, checked copy of the model to rewrite (a file is read fresh, a proto copied).

    Checking the input first means a checker failure of the result is a rewriter
    bug, not a problem the caller brought in.
    """
    if not isinstance(model, onnx.ModelProto):
        return load_model(model)
    try:
        check_model(model)
    except onnx.checker.ValidationError as exc:
        raise ModelFileError(
            f"the model is not valid ONNX ({first_line(exc)}); fix it so that "
            "onnx.checker.check_model accepts it"
        ) from exc
    work = onnx.ModelProto()
    work.CopyFrom(model)
    return work


def _candidates(
    scopes: list[Scope], method: str, matcher: Matcher
) -> tuple[list[_Candidate], list[tuple[str, str]]]:
    """One candidate per distinct (tensor, scope label, method), in topological order
    of the tensors, and the (probe label, tensor) of op-type matches skipped because
    their tensor is not float.

    A tensor leaving one scope and entering the next (Conv -> Conv) is a candidate
    of each, as the native front ends record ``conv1:after`` and ``conv2:before``;
    a scope matched by several patterns is one candidate, and so are nodes
    matched by op type that share their module's tensor (they are labeled by the
    module: :meth:`Matcher.probe_label`). A layer or node named by the caller
    whose tensor is integer or bool raises ProbeDtypeError.
    """
    index = matcher.index
    methods = probe_methods(method)
    finders = {"before": before_tensor, "after": after_tensor}
    found: dict[tuple[str, str, str], _Candidate] = {}
    skipped: list[tuple[str, str]] = []
    for group, scope in enumerate(scopes):
        calls = split_calls(scope, index)
        for call in calls:
            for m in methods:
                hit = finders[m](call, index)
                if hit is None:
                    continue
                node, tensor = hit
                if not index.probeable(tensor):
                    if scope.kind != "op":
                        raise dtype_error(f"{scope.label}:{m}", index.dtype_name(tensor))
                    skipped.append((f"{scope.label}:{m}", tensor))
                    continue
                label = matcher.probe_label(call, m, tensor)
                found.setdefault(
                    (tensor, label, m),
                    _Candidate(tensor, label, m, node, group if len(calls) > 1 else None),
                )
    ordered = sorted(found.values(), key=lambda c: (index.position(c.tensor), c.method))
    return ordered, skipped


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


def _make_probes(
    model: onnx.ModelProto,
    index: GraphIndex,
    candidates: list[_Candidate],
    overrides: dict[str, int],
    pack: bool,
) -> list[Probe]:
    """Turn candidates into Probes and add their graph outputs to ``model``.

    Each tensor becomes one graph output, shared by every probe that watches it
    (packed outputs are shared by probes with the same channel axis).
    """
    layout = infer_channel_axes(index, is_channels_last(model))
    units = _probe_units(candidates)  # the calls of one module make one probe
    names = _unique_probe_names([unit[0] for unit in units])
    # A key that named nothing would be ignored silently and its probe miscounted.
    check_override_keys(overrides, names, [k for c in candidates for k in (c.label, c.tensor)])
    editor = Editor(model.graph, all_names(model.graph, index.names), model.ir_version, default_opset(model))
    outputs: dict[tuple[str, int | None], str] = {}
    probes = []
    for unit, name in zip(units, names):
        calls = [_make_probe(cand, name, index, layout, overrides, pack, editor, outputs) for cand in unit]
        probes.append(replace(calls[0], calls=tuple(calls[1:])) if len(calls) > 1 else calls[0])
    return probes


def _probe_units(candidates: list[_Candidate]) -> list[list[_Candidate]]:
    """Candidates grouped into probes: the calls of one module (same group, label and
    method) together, in call order; every other candidate alone."""
    units: dict[tuple, list[_Candidate]] = {}
    for k, cand in enumerate(candidates):
        key = (cand.group, cand.label, cand.method) if cand.group is not None else (k,)
        units.setdefault(key, []).append(cand)
    return list(units.values())


def _make_probe(
    cand: _Candidate,
    name: str,
    index: GraphIndex,
    layout: Layout,
    overrides: dict[str, int],
    pack: bool,
    editor: Editor,
    outputs: dict[tuple[str, int | None], str],
) -> Probe:
    """The Probe of one candidate; adds its graph output (or shares one already added)."""
    shape = shape_of(index.types[cand.tensor])
    axis, guessed = _probe_axis(cand, shape, layout, index)
    key = next((k for k in (name, cand.tensor, cand.label) if k in overrides), None)
    if key is not None:
        axis, guessed = checked_override(key, overrides[key], name, shape), False
    if guessed:
        warn_guessed(name, shape, axis, f"tensor {cand.tensor!r}", stacklevel=6)
    n_neurons = 1 if len(shape) == 1 and axis == 1 else shape[axis]
    if pack and n_neurons is None:
        raise OptionError(
            f"pack_in_graph needs the number of neurons of probe {name!r} (tensor "
            f"{cand.tensor!r}, axis {axis}) to be known statically; export the model "
            "with a fixed channel size or use pack_in_graph=False"
        )
    out_key = (cand.tensor, axis if pack else None)
    if out_key not in outputs:
        outputs[out_key] = editor.output(cand.tensor, index, axis, pack)
    node = index.graph.node[cand.node]
    return Probe(name, cand.label, node.name, node.op_type, cand.method, cand.tensor,
                 outputs[out_key], axis, shape, n_neurons, pack, guessed,
                 shape_output=editor.shape_outputs.get(outputs[out_key]))  # fmt: skip


def _probe_axis(cand: _Candidate, shape: tuple, layout: Layout, index: GraphIndex) -> tuple[int, bool]:
    """(neuron axis, guessed) of a candidate: its tensor's layout, except that the
    tensor entering a conv-family node is read by it as ``[N, C, ...]`` (axis 1)."""
    node = index.graph.node[cand.node]
    if (
        cand.method == "before" and len(shape) >= 2
        and node.op_type in CHANNEL_READERS and node.input and node.input[0] == cand.tensor
    ):  # fmt: skip
        return 1, False
    return layout.axes[cand.tensor], cand.tensor in layout.guessed
