"""PyTorch -> ONNX: :func:`from_torch`.

The dynamo exporter (``torch.onnx.export(..., dynamo=True)``) is the default.
Its own optimizer would fold every BatchNorm into the Conv before it (the
onnxscript rule ``FuseBatchNormIntoConv``), which erases the Conv module's
output, so the model is exported unoptimized and then cleaned up here by
constant folding and the onnxscript rewrite rules that never merge two
modules' computations. Nodes keep the exporter's ``pkg.torch.onnx.name_scopes``
and ``pkg.torch.onnx.class_hierarchy`` metadata, which is how ``attach_to``
finds modules by name (``"features.0"``) or class (``"Conv2d"``).

The legacy TorchScript exporter (``dynamo=False``) runs with
``training=TrainingMode.PRESERVE`` and ``do_constant_folding=False`` so that
it, too, keeps BatchNorm separate; its node names carry the module path
(``/features/features.0/Conv``).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import os
import re
import tempfile
import warnings
from pathlib import Path

import onnx

from tensorstate_onnx._optional import import_optional
from tensorstate_onnx.errors import OptionError, OptionTypeError
from tensorstate_onnx.graph.metadata import TORCH_CLASS_HIERARCHY, TORCH_NAME_SCOPES

__all__ = ["from_torch"]

# onnxscript rewrite rules that rewrite one node at a time. Rules that merge two
# nodes may merge the ops of different modules and erase the tensor between them
# (BatchNorm into Conv or Gemm, Pad into Conv, successive Relu/Clip, Min/Max into
# Clip, and Reshape+Reshape, Transpose+Transpose, Cast+Cast,
# Unsqueeze+Unsqueeze, Squeeze+Reshape: GPT-2's attention ends in a view that
# its c_proj's own view followed, and merging them erased c_proj's input),
# or make nodes without module metadata (Slices into a Split, which cut GPT-2's
# attention in two): they are left out so every module keeps its own tensors.
# onnxruntime's own optimizer does the same merges on the session, where it
# keeps every tensor a probe exposes.
_SAFE_RULES = (
    "add_0_rule", "sub_0_rule", "mul_by_1_rule", "div_by_1_rule",
    "dropout_inference_rule", "dropout_zero_rule",
    "no_op_cast_rule", "no_op_expand_rule", "no_op_transpose_rule", "flatten_to_reshape_rule",
    "cast_constant_of_shape_rule", "cast_constant_of_shape_without_value_rule",
    "collapse_slice_rule", "collapse_slice2_rule", "materialize_reshape_shape_rule",
    "no_op_dynamic_scatter_nd_rule", "no_op_static_scatter_nd_rule",
    "remove_optional_bias_from_conv_rule", "remove_optional_bias_from_conv_transpose_rule",
    "remove_optional_bias_from_gemm_rule",
)  # fmt: skip


def _import_torch():
    return import_optional("torch", "torch", "from_torch")


def _normalize_inputs(torch, example_inputs) -> tuple[tuple, dict]:
    """``(args, kwargs)`` from a tensor, a tuple/list of inputs, or a dict of keyword inputs."""
    if example_inputs is None:
        raise OptionError(
            "exporting a torch module to ONNX needs example_inputs: a tensor or a tuple of "
            "tensors shaped like one batch (e.g. torch.zeros(1, 3, 224, 224))"
        )
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        if not example_inputs:
            raise OptionError("example_inputs is empty; give at least one tensor shaped like one batch")
        return tuple(example_inputs), {}
    raise OptionTypeError(
        f"example_inputs must be a torch.Tensor, a tuple/list of inputs or a dict of keyword "
        f"inputs, got {type(example_inputs).__name__}"
    )


def _forward_parameters(module) -> tuple[list[str], list[str], bool] | None:
    """(named parameters, required ones, takes ``**kwargs``) of ``module.forward``, or
    None when its signature cannot be read."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    required = [p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return named, required, any(p.kind == p.VAR_KEYWORD for p in params)


def _inputs_hint(module) -> str:
    """What to pass as example_inputs: the forward's parameters and an example dict."""
    found = _forward_parameters(module)
    if found is None:
        return "pass example_inputs that the module's forward accepts"
    named, required, _ = found
    example = ", ".join(f"{name!r}: <tensor>" for name in (required or named[:1]))
    return (
        f"its forward takes {', '.join(named) or 'no named parameters'} (required: "
        f"{', '.join(required) or 'none'}); pass what it needs as example_inputs, a dict of "
        f"keyword inputs such as {{{example}}} or a tuple in parameter order"
    )


def _check_arguments(module, args: tuple, kwargs: dict) -> None:
    """Refuse example inputs that the forward cannot be bound to, naming what to pass.

    Without this the exporters fail deep inside tracing with a bare TypeError and
    a hint about traceability that does not apply.
    """
    found = _forward_parameters(module)
    if found is None:  # no readable signature: the forward pass will tell
        return
    try:
        inspect.signature(module.forward).bind(*args, **kwargs)
    except TypeError as exc:
        named, required, var_keyword = found
        given = named[: len(args)] + list(kwargs)
        missing = [name for name in required if name not in given]
        unknown = [] if var_keyword else [name for name in kwargs if name not in named]
        cls = type(module).__name__
        if missing:
            problem = f"{cls}.forward needs {', '.join(missing)}, which example_inputs does not give"
        elif unknown:
            problem = f"{cls}.forward takes no argument {', '.join(unknown)}"
        else:
            problem = f"{cls}.forward cannot be called with example_inputs ({exc})"
        raise OptionError(f"{problem}; {_inputs_hint(module)}") from exc


def _check_forward(torch, module, args: tuple, kwargs: dict) -> None:
    """Run the forward once on the example inputs, so that a model refusing them (a
    Hugging Face encoder-decoder without ``decoder_input_ids``) is reported as an
    input problem, with the inputs to pass, rather than as an export failure."""
    try:
        _count_outputs(torch, module, args, kwargs)
    except Exception as exc:
        raise OptionError(
            f"{type(module).__name__} fails on example_inputs before any export ({_reason(exc)}); "
            f"{_inputs_hint(module)}"
        ) from exc


def _batch_of_two(torch, value):
    """Repeat a batch of one so that the exporter does not specialize the batch axis to 1."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == 1:
        return torch.cat([value, value])
    return value


def _reason(exc: BaseException) -> str:
    """A short account of why an exporter failed: the root cause and the user code line."""
    root = exc
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # the exporter colors its messages
    summary = re.search(r"## Exception summary\s+(.+?)(?:\n\s*\n|$)", text, re.S)
    if summary:
        reason = " ".join(summary.group(1).split())
    else:
        first = next((line.strip() for line in str(root).splitlines() if line.strip()), "")
        reason = f"{type(root).__name__}: {first}" if first else type(root).__name__
    where = re.search(r"The following call raised this error:\s*\n\s*(File [^\n]+)\n\s*([^\n]+)", text)
    if where:
        reason += f" (at {where.group(1).strip()}: {where.group(2).strip()})"
    if len(reason) > 1200:
        reason = reason[:1200] + " ..."
    return reason


def _export_error(exc: BaseException, module, dynamo: bool) -> OptionError:
    exporter = "dynamo (torch.export)" if dynamo else "TorchScript (legacy)"
    hint = (
        "make the forward traceable by torch.export (no data-dependent Python control flow, "
        "no numpy calls), or try dynamo=False"
        if dynamo
        else "make the forward traceable by torch.jit.trace, or try dynamo=True"
    )
    return OptionError(
        f"could not export {type(module).__name__} to ONNX with the {exporter} exporter: "
        f"{_reason(exc)}; {hint}"
    )


def _optimize(model_ir) -> None:
    """Fold constants and apply the layer-preserving onnxscript rewrite rules, in place."""
    import onnxscript.optimizer
    import onnxscript.rewriter
    from onnxscript.rewriter.rules import common

    rules = [getattr(common, name) for name in _SAFE_RULES if hasattr(common, name)]
    for _ in range(2):
        onnxscript.optimizer.fold_constants(model_ir)
        onnxscript.rewriter.rewrite(model_ir, pattern_rewrite_rules=rules)
        onnxscript.optimizer.remove_unused_nodes(model_ir)


def _set_batch_dims(model: onnx.ModelProto) -> None:
    """Name the leading dynamic dimension of the graph inputs and outputs ``batch``."""
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"


def _is_token_input(torch, value) -> bool:
    """An integer ``[batch, sequence]`` tensor: token ids, attention masks, position or
    token-type ids, whose second axis is exported dynamic as ``sequence``."""
    return value.dim() == 2 and not value.is_floating_point() and value.dtype != torch.bool and value.shape[1] > 1


@contextlib.contextmanager
def _without_cache(module):
    """Turn off a Hugging Face model's key/value cache while it is exported: the cache
    object it returns is not a tensor, and states are measured on whole sequences."""
    config = getattr(module, "config", None)
    if not getattr(config, "use_cache", False):
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


def _checked_dynamic_axes(module, args, kwargs, dynamic_axes) -> dict[str, dict[int, str]]:
    """``dynamic_axes`` as ``{input: {axis: name}}``, refused with a message when it
    names an input the example inputs do not give or an axis they do not have."""
    if dynamic_axes is None:
        return {}
    if not isinstance(dynamic_axes, dict) or not all(isinstance(v, dict) for v in dynamic_axes.values()):
        raise OptionTypeError(
            "dynamic_axes must map input names to {axis: dimension name} dicts, e.g. "
            "{'input_ids': {0: 'batch', 1: 'sequence'}}"
        )
    given = dict(zip(inspect.signature(module.forward).parameters, args)) | dict(kwargs)
    for name, axes in dynamic_axes.items():
        if name not in given:
            raise OptionError(
                f"dynamic_axes names {name!r}, which is not among the example inputs "
                f"({', '.join(given) or 'none'}); use the forward's parameter names"
            )
        rank = getattr(given[name], "ndim", 0)
        bad = [axis for axis in axes if not isinstance(axis, int) or not 0 <= axis < rank]
        if bad or not all(isinstance(label, str) and label for label in axes.values()):
            raise OptionError(
                f"dynamic_axes[{name!r}] = {axes!r}: give axes 0..{rank - 1} of that input, "
                "each with a non-empty dimension name"
            )
    return dynamic_axes


def _export_dynamo(torch, module, args, kwargs, opset, input_names, output_names, dynamic_axes):
    args = tuple(_batch_of_two(torch, a) for a in args)
    kwargs = {k: _batch_of_two(torch, v) for k, v in kwargs.items()}
    dims: dict[str, object] = {}

    def dim(name: str):
        return dims.setdefault(name, torch.export.Dim(name))

    def spec(name, value):
        if name in dynamic_axes:
            return {int(axis): dim(label) for axis, label in dynamic_axes[name].items()} or None
        if not isinstance(value, torch.Tensor) or value.dim() < 1:
            return None
        if _is_token_input(torch, value):
            return {0: dim("batch"), 1: dim("sequence")}
        return {0: dim("batch")}

    names = list(inspect.signature(module.forward).parameters)
    dynamic_shapes = tuple(spec(name, a) for name, a in zip(names, args))
    if kwargs or dynamic_axes:
        # torch.export wants one spec per forward parameter, by name.
        positional = dict(zip(names, dynamic_shapes))
        dynamic_shapes = {**positional, **{k: spec(k, v) for k, v in kwargs.items()}}
    program = torch.onnx.export(
        module, args, kwargs=kwargs or None, dynamo=True, optimize=False, verbose=False,
        opset_version=opset, input_names=input_names, output_names=output_names,
        dynamic_shapes=dynamic_shapes,
    )  # fmt: skip
    import onnx_ir

    _optimize(program.model)
    return onnx_ir.serde.serialize_model(program.model)


def _count_outputs(torch, module, args, kwargs) -> int:
    """Number of tensors the module returns (one forward pass with probes switched off)."""
    captures = list(getattr(module, "efficiency_layers", None) or [])
    states = [c.capture_on for c in captures]
    for capture in captures:
        capture.capture_on = False
    try:
        with torch.no_grad():
            result = module(*args, **kwargs)
    finally:
        for capture, state in zip(captures, states):
            capture.capture_on = state
    leaves, _ = torch.utils._pytree.tree_flatten(result)
    return sum(isinstance(leaf, torch.Tensor) for leaf in leaves)


def _export_legacy(torch, module, args, kwargs, opset, input_names, output_names, dynamic_axes):
    params = [
        p.name for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]  # fmt: skip
    if input_names is None:
        positional = [name for name, a in zip(params, args) if isinstance(a, torch.Tensor)]
        if len(positional) < sum(isinstance(a, torch.Tensor) for a in args):
            positional = [f"input_{i}" for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        input_names = positional + [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    if output_names is None:
        n_out = _count_outputs(torch, module, args, kwargs)
        output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    if kwargs:
        args = (*args, kwargs)
    dynamic_axes = {**{name: {0: "batch"} for name in (*input_names, *output_names)}, **dynamic_axes}
    with tempfile.TemporaryDirectory(prefix="tensorstate-export-") as tmp:
        path = Path(tmp, "model.onnx")
        torch.onnx.export(
            module, args, str(path), dynamo=False, verbose=False, opset_version=opset,
            input_names=list(input_names), output_names=list(output_names),
            dynamic_axes=dynamic_axes, training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,
        )  # fmt: skip
        proto = onnx.load(str(path))  # external data, if any, is read into memory
    _annotate_legacy_scopes(proto, module)
    return proto


def _unqualified(qualname: str) -> str:
    """The scope name the TorchScript exporter gives a module: its qualified name from
    the last non-numeric atom on (``features.1.conv.0.0`` -> ``conv.0.0``)."""
    atoms = qualname.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return qualname


def _legacy_child(children, part: str):
    """The (qualified name, module) among ``children`` that a legacy scope name stands
    for. TorchScript names the second, third, ... call of a module ``<name>_1``,
    ``<name>_2``: those are the module's own calls when no child bears that name."""
    for full, child in children:
        if _unqualified(full) == part:
            return full, child
    repeat = re.fullmatch(r"(.+)_\d+", part)
    if repeat is not None:
        for full, child in children:
            if _unqualified(full) == repeat.group(1):
                return full, child
    return None


def _annotate_legacy_scopes(proto: onnx.ModelProto, module) -> None:
    """Give legacy-exported nodes the dynamo exporter's module metadata.

    A legacy node name such as ``/features/features.1/conv/conv.0/conv.0.0/Conv``
    lists the scope names of the modules around the node (see
    :func:`_unqualified`). Walking the module tree resolves them to qualified
    names and classes, stored as ``pkg.torch.onnx.name_scopes`` and
    ``pkg.torch.onnx.class_hierarchy`` exactly as the dynamo exporter does, so
    ``attach_to`` can use module classes (``"Conv2d"``) with either exporter.
    """
    def typename(obj) -> str:
        cls = type(obj)
        return f"{cls.__module__}.{cls.__qualname__}"

    import torch

    def never_called(sub) -> bool:
        """A container without a forward of its own (ModuleList, ModuleDict): it has no
        scope, so ``/blocks.0/MatMul`` is ``blocks.0`` of the root's ``blocks`` list. A
        subclass with a forward (DenseNet's ``_DenseBlock``) is called and has one."""
        return type(sub).forward is torch.nn.Module.forward

    # The modules a scope may hold: its children, and the children of those never called.
    children: dict[str, list[tuple[str, object]]] = {}
    for qualname, sub in module.named_modules():
        if never_called(sub):
            continue
        pending = [(qualname, sub)]
        while pending:
            prefix, holder = pending.pop(0)
            for name, child in holder.named_children():
                full = f"{prefix}.{name}" if prefix else name
                children.setdefault(qualname, []).append((full, child))
                if never_called(child):
                    pending.append((full, child))
    for node in proto.graph.node:
        if not node.name.startswith("/"):
            continue
        parts = [part for part in node.name.split("/")[1:-1] if part]
        names, classes = [""], [typename(module)]
        current = ""
        for part in parts:
            found = _legacy_child(children.get(current, ()), part)
            if found is None:
                break
            current = found[0]
            names.append(current)
            classes.append(typename(found[1]))
        if len(names) == 1:
            continue
        op = node.name.rsplit("/", 1)[-1]
        existing = {prop.key for prop in node.metadata_props}
        for key, values in (
            (TORCH_NAME_SCOPES, names + [op]),
            (TORCH_CLASS_HIERARCHY, classes + [node.op_type]),
        ):
            if key not in existing:
                entry = node.metadata_props.add()
                entry.key, entry.value = key, repr(values)


def from_torch(
    module,
    example_inputs=None,
    path: str | os.PathLike | None = None,
    dynamo: bool = True,
    opset: int = 18,
    input_names=None,
    output_names=None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> onnx.ModelProto:
    """Export a PyTorch module to ONNX, keeping every module's output for probing.

    Args:
        module: the ``torch.nn.Module``. It is exported in eval mode (its mode is
            restored afterwards); hooks attached by ``attach_hooks`` record nothing
            while it is traced.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of
            keyword inputs, shaped like one batch. The batch axis (axis 0) of every
            tensor input and output is exported as the dynamic dimension ``batch``;
            with the dynamo exporter the second axis of integer ``[batch, length]``
            inputs (token ids, attention masks) is the dynamic ``sequence``. A
            Hugging Face model's key/value cache (``config.use_cache``) is off
            while it is exported.
        path: also write the model there (weights over 2 GB go to
            ``<file name>.data`` beside it). Without a path nothing is written.
        dynamo: use the torch.export-based exporter (default); ``False`` uses
            the legacy TorchScript exporter.
        opset: ONNX opset version of the default domain.
        input_names, output_names: names of the graph inputs and outputs
            (defaults: the forward's parameter names; the exporter's output
            names, or ``output``/``output_<i>`` with the legacy exporter).
        dynamic_axes: ``{input name: {axis: dimension name}}`` replacing the
            default dynamic axes of the inputs it names (the forward's parameter
            names): ``{"pixel_values": {0: "batch", 2: "height", 3: "width"}}``,
            or ``{"input_ids": {0: "batch"}}`` to fix the sequence length. Axes
            sharing a dimension name must be equal.

    Returns:
        The ``onnx.ModelProto``, weights in memory. BatchNorm stays a separate
        ``BatchNormalization`` node, so a probed Conv sees the Conv's own output.

    Raises:
        TypeError: ``module`` is not a ``torch.nn.Module``.
        ValueError: no ``example_inputs``, example inputs the forward cannot be
            called with (the message names the missing or unknown arguments and
            what to pass), or the exporter failed (the message carries the
            exporter's reason; the original exception is chained).
    """
    torch = _import_torch()
    if not isinstance(module, torch.nn.Module):
        raise OptionTypeError(f"from_torch takes a torch.nn.Module, got {type(module).__name__}")
    args, kwargs = _normalize_inputs(torch, example_inputs)
    if kwargs:  # keyword inputs become graph inputs in the forward's parameter order
        params = list(inspect.signature(module.forward).parameters)
        kwargs = dict(sorted(kwargs.items(), key=lambda kv: params.index(kv[0]) if kv[0] in params else len(params)))
    _check_arguments(module, args, kwargs)
    dynamic_axes = _checked_dynamic_axes(module, args, kwargs, dynamic_axes)
    was_training = module.training
    module.eval()
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output), warnings.catch_warnings(), _without_cache(module):
            warnings.simplefilter("ignore")
            _check_forward(torch, module, args, kwargs)
            if dynamo:
                proto = _export_dynamo(torch, module, args, kwargs, opset, input_names, output_names, dynamic_axes)
            else:
                proto = _export_legacy(torch, module, args, kwargs, opset, input_names, output_names, dynamic_axes)
    except OptionError:
        raise
    except Exception as exc:
        raise _export_error(exc, module, dynamo) from exc
    finally:
        module.train(was_training)
    _set_batch_dims(proto)
    if path is not None:
        from tensorstate_onnx.graph import save_model

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(proto, path)
    return proto
