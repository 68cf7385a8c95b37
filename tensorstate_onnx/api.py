"""``build_efficiency_model`` and ``reset_efficiency_model``: dispatch by model type.

ONNX models (a ModelProto or a path) go to onnxruntime. Keras models get
``StateCapture`` layers and torch modules get hooks, unless
``runtime="onnxruntime"`` asks for the ONNX path, which exports them first.
Model types are recognised by their classes' names, so no framework is
imported unless the model comes from it.
"""

from __future__ import annotations

import os

import onnx

from .errors import OptionError, OptionTypeError
from .patterns import probe_methods
from .runtime import OnnxEfficiencyModel

__all__ = ["build_efficiency_model", "reset_efficiency_model", "model_kind"]

_RUNTIMES = (None, "native", "onnxruntime")
_NATIVE_OPTIONS = ("keep_states", "overwrite", "channel_axes")


def model_kind(model) -> str:
    """``"onnx"``, ``"torch"`` or ``"keras"``; ``TypeError`` for anything else."""
    if isinstance(model, (onnx.ModelProto, str, os.PathLike)):
        return "onnx"
    for cls in type(model).__mro__:
        qualified = f"{cls.__module__}.{cls.__qualname__}"
        if qualified == "torch.nn.modules.module.Module":
            return "torch"
        if cls.__qualname__ in ("Model", "Layer") and cls.__module__.split(".")[0] in ("keras", "tf_keras"):
            return "keras"
    raise OptionTypeError(
        f"unsupported model type {type(model).__module__}.{type(model).__qualname__}; "
        "build_efficiency_model takes an onnx.ModelProto, a path to an .onnx file, "
        "a keras.Model or a torch.nn.Module"
    )


def build_efficiency_model(
    model,
    attach_to,
    exclude=(),
    method: str = "after",
    storage_path: str | os.PathLike | None = None,
    *,
    runtime: str | None = None,
    example_inputs=None,
    **options,
):
    """Attach state probes to ``model`` (TensorState 0.4 API, extended to ONNX).

    Args:
        model: ``onnx.ModelProto`` or ``.onnx`` path, ``keras.Model`` or
            ``torch.nn.Module``.
        attach_to: layer/module class names (``"Conv2d"``, ``"Conv2D"``), layer
            or module names, ONNX op types or node names; globs allowed.
        exclude: names that must not be probed; wins over ``attach_to``.
        method: ``"before"``, ``"after"`` or ``"both"``.
        storage_path: directory for the raw states (zarr); ``None`` keeps them
            in memory for the native front ends and not at all on the ONNX path.
        runtime: ``None``/``"native"`` (Keras layers or torch hooks) or
            ``"onnxruntime"`` (export, then the ONNX path). ONNX models always
            use onnxruntime.
        example_inputs: inputs used to export a torch module to ONNX.
        options: passed to :class:`~tensorstate_onnx.runtime.OnnxEfficiencyModel`
            (providers, optimization, pack_in_graph, channel_axes, ...) or to
            the exporter (``dynamo``, ``opset``); the native front ends take
            ``keep_states``, ``overwrite`` and ``channel_axes`` only (and PyTorch
            hooks ``mask_input``, as the ONNX path does).
            ``channel_axes={probe name: axis}`` overrides the neuron axis of a
            probe on every path (DESIGN §1 gives the rule); a key that names no
            probe or an axis out of range raises ChannelAxisError.

    Returns:
        An ``OnnxEfficiencyModel``, a new Keras model with StateCapture layers,
        or the same torch module with hooks; each has ``efficiency_layers``.
    """
    if runtime not in _RUNTIMES:
        raise OptionError(f"runtime must be None, 'native' or 'onnxruntime', got {runtime!r}")
    probe_methods(method)
    kind = model_kind(model)
    if kind == "onnx":
        return OnnxEfficiencyModel(model, attach_to, exclude, method, storage_path, **options)
    if runtime == "onnxruntime":
        from . import converters

        export_options = {key: options.pop(key) for key in ("dynamo", "opset") if key in options}
        if kind == "torch":
            if example_inputs is None:
                raise OptionError(
                    "exporting a torch module to ONNX needs example_inputs (a tensor or a tuple "
                    "of tensors shaped like one batch)"
                )
            proto = converters.from_torch(model, example_inputs, **export_options)
        else:
            proto = converters.from_keras(model, **export_options)
        return OnnxEfficiencyModel(proto, attach_to, exclude, method, storage_path, **options)
    native = {key: options.pop(key) for key in _NATIVE_OPTIONS if key in options}
    if kind == "torch" and "mask_input" in options:
        native["mask_input"] = options.pop("mask_input")
    if options:
        raise OptionTypeError(
            f"options {sorted(options)} only apply to the ONNX path (runtime='onnxruntime'); "
            f"the native front ends take {', '.join(_NATIVE_OPTIONS)}"
        )
    if kind == "torch":
        from .torch_capture import attach_hooks

        return attach_hooks(model, attach_to, exclude, method, storage_path, **native)
    from .keras_capture import build_keras_efficiency_model

    return build_keras_efficiency_model(model, attach_to, exclude, method, storage_path, **native)


def reset_efficiency_model(model) -> None:
    """Forget the states of every probe of ``model`` (``state_count`` becomes 0)."""
    layers = getattr(model, "efficiency_layers", None)
    if layers is None:
        raise OptionError(
            f"{type(model).__name__} has no efficiency_layers; build it with build_efficiency_model first"
        )
    for layer in layers:
        layer.reset_states()

