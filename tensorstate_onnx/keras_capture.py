"""Keras 3 front end: the ``StateCapture`` layer and the model rebuild.

:class:`StateCapture` is an identity layer that records the firing states of
the tensor passing through it. With the TensorFlow backend it records in eager
calls and inside the compiled ``tf.function`` of ``model.predict`` /
``model.evaluate`` / ``model.fit`` alike: the recording is a host callback
(``tf.numpy_function``) whose token the output depends on, so the model keeps
running as a graph (no ``run_eagerly``); only XLA is switched off for models
that contain the layer (``supports_jit = False``). With the torch or numpy
backends the layer sees concrete tensors and records them directly; with JAX
it uses ``jax.debug.callback``.

:func:`build_keras_efficiency_model` returns a new model with StateCapture
layers before/after the chosen layers; the layers (and so the weights) are
those of the given model, which is left as it was. The rebuilt model also
marks where each forward pass begins and ends (:class:`PassBegin` on its inputs,
:class:`PassEnd` on its outputs): its captures hold what they record until the
pass ends, and a pass that raised midway is dropped, with a warning, when the
next one begins, so that every probe holds the same batches.

This module imports keras; ``import tensorstate_onnx`` never imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np

from .axes import check_override_keys, checked_override, checked_type, dtype_error, is_float_dtype_name
from .capture import AbstractStateCapture, sweep_stale_stores
from .errors import ModelInputError, OptionTypeError, ProbeMatchError
from .keras_passes import BOUNDARIES, PassBegin, PassEnd, tracing_for_export
from .keras_training import EfficiencyCallback
from .patterns import as_patterns, matches_any, preview, probe_methods
from .store import check_storage_root, unique_store_dirname

__all__ = ["EfficiencyCallback", "PassBegin", "PassEnd", "StateCapture", "build_keras_efficiency_model"]

_NUMPY_DTYPES = (np.float16, np.float32, np.float64)

# Layers whose output has its input's neuron axis (DESIGN §1: elementwise layers inherit it).
_ELEMENTWISE = frozenset({
    "Activation", "ReLU", "LeakyReLU", "ELU", "PReLU", "Softmax", "Identity", "Rescaling",
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise", "GaussianDropout",
    "AlphaDropout", "ActivityRegularization", "Add", "Subtract", "Multiply", "Average", "Maximum", "Minimum",
})  # fmt: skip
# Normalization layers whose ``axis`` (an int) is the feature axis.
_AXIS_NORMALIZATION = frozenset({"BatchNormalization", "GroupNormalization"})


def _rank(tensor) -> int | None:
    shape = getattr(tensor, "shape", None)
    return None if shape is None else len(shape)


def _output_axis(layer, input_axis: int, input_rank: int | None, output_rank: int | None) -> int:
    """The neuron axis of ``layer``'s output (``-1``: the last), from the axis of what
    it reads: channels-first layers give axis 1, batch and group normalization their
    ``axis``, elementwise layers (and captures) the axis they read; anything else
    the last axis, as everything in channels-last Keras."""
    if output_rank is None or output_rank <= 2:
        return -1
    if getattr(layer, "data_format", None) == "channels_first":
        return 1
    name = type(layer).__name__
    if name in _AXIS_NORMALIZATION and isinstance(getattr(layer, "axis", None), int):
        return _last_as_minus_one(layer.axis, output_rank)
    if (name in _ELEMENTWISE or isinstance(layer, AbstractStateCapture)) and input_rank == output_rank:
        return input_axis
    return -1


def _last_as_minus_one(axis: int, rank: int) -> int:
    axis %= rank
    return -1 if axis == rank - 1 else axis


def _read_axis(layer, tensor_axis: int) -> int:
    """The neuron axis of a tensor ``layer`` reads: axis 1 for a channels-first layer
    (what it reads as channels), else the axis the tensor has."""
    return 1 if getattr(layer, "data_format", None) == "channels_first" else tensor_axis


def _as_numpy(value) -> np.ndarray:
    """A numpy array the engine accepts (float16/32/64 or bool) for any backend value."""
    array = value if isinstance(value, np.ndarray) else np.asarray(keras.ops.convert_to_numpy(value))
    if array.dtype.type not in _NUMPY_DTYPES:  # bfloat16: the firing pattern only
        with np.errstate(invalid="ignore"):
            array = np.asarray(array > 0)
    return array


@keras.saving.register_keras_serializable(package="tensorstate_onnx")
class StateCapture(keras.layers.Layer, AbstractStateCapture):
    """Keras layer that records neuron states and returns its input unchanged.

    Args:
        name: the layer's (and capture's) name, unique within the model.
        disk_path: directory of a zarr store for the raw states, or ``None``.
        keep_states: keep raw states in memory when there is no ``disk_path``.
        overwrite: replace an existing store at ``disk_path``.
        metadata: extra facts stored with the states.
        channel_axis: the neuron axis; Keras is channels-last, so ``-1`` (a
            rank-1 ``[N]`` tensor is one neuron per sample either way). It is
            checked against the input's rank and made non-negative when the
            layer is built; ``channel_axis`` then holds that axis.
        label: the name of the probed layer (defaults to ``name``).
        method: ``"before"`` or ``"after"`` the probed layer (informative).
        **kwargs: passed to ``keras.layers.Layer`` (``dtype``, ``trainable``).

    Works in eager calls, ``model.predict``/``evaluate``/``fit`` (graph mode,
    no XLA) with float16, bfloat16, float32 and float64 tensors; integer and bool
    tensors raise :class:`~tensorstate_onnx.errors.ProbeDtypeError`. A batch counts
    as soon as the layer sees it, unless the model has a :class:`PassBegin` and
    :class:`PassEnd` (as :func:`build_keras_efficiency_model` adds): then it counts
    when its forward pass ends.
    """

    def __init__(
        self,
        name: str,
        disk_path: str | os.PathLike | None = None,
        keep_states: bool = True,
        overwrite: bool = False,
        metadata: dict | None = None,
        channel_axis: int = -1,
        label: str | None = None,
        method: str = "after",
        **kwargs,
    ):
        kwargs.setdefault("autocast", False)  # an identity must not cast its input
        keras.layers.Layer.__init__(self, name=name, **kwargs)
        meta = {"method": method, "framework": "keras", "label": label or name, **(metadata or {})}
        AbstractStateCapture.__init__(self, name, disk_path, keep_states, overwrite, meta)
        self._axis_config = int(channel_axis)
        self.channel_axis = int(channel_axis)
        self.label = label or name
        self.method = method
        self.supports_masking = True
        self.supports_jit = False  # the host callback cannot run under XLA

    # ---------------------------------------------------------------- keras API

    def build(self, input_shape) -> None:
        """Remember the input shape (the states are kept until ``reset_states``) and
        check the neuron axis against its rank."""
        self.input_shape = input_shape
        if input_shape is not None and len(input_shape) > 0:
            self.channel_axis = checked_override(self.name, self._axis_config, self.name, tuple(input_shape))
        self.built = True

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_output_spec(self, inputs, *args, **kwargs):
        self._check_dtype(inputs.dtype)
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype, sparse=getattr(inputs, "sparse", False))

    def _check_dtype(self, dtype) -> None:
        name = keras.backend.standardize_dtype(dtype)
        if not is_float_dtype_name(name):
            raise dtype_error(f"{self.label}:{self.method}", name)

    def compute_mask(self, inputs, mask=None):
        return mask

    def call(self, inputs, channel_axis: int | None = None):
        """Record ``inputs`` (neurons on ``channel_axis``, else the layer's axis: a
        shared layer's later call may read a tensor of another layout) and return it."""
        if tracing_for_export():
            return inputs  # traced for ONNX export: a plain identity
        self._check_dtype(inputs.dtype)
        axis = self.channel_axis
        if channel_axis is not None:
            axis = checked_override(self.name, channel_axis, self.name, tuple(inputs.shape))

        def record(value):
            return self._record_host(value, axis)

        backend = keras.backend.backend()
        if backend == "tensorflow":
            import tensorflow as tf

            if tf.executing_eagerly():
                record(inputs.numpy() if hasattr(inputs, "numpy") else inputs)
                return inputs
            token = tf.numpy_function(record, [inputs], Tout=tf.bool, stateful=True, name="record_states")
            with tf.control_dependencies([token]):
                return tf.identity(inputs)
        if backend == "jax":
            import jax

            jax.debug.callback(lambda value: record(value) and None, inputs, ordered=True)
            return inputs
        record(inputs)  # torch / numpy backends: concrete tensors
        return inputs

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            keep_states=self.keep_states and self.disk_path is None,
            channel_axis=self._axis_config,
            label=self.label,
            method=self.method,
        )
        return config

    def reset_states(self, input_shape=None) -> None:
        """Forget every recorded state, and the batch of a pass that never finished
        (held until the next pass would have dropped it, see :class:`PassBegin`)."""
        self.drop()
        super().reset_states(input_shape)

    # ---------------------------------------------------------------- recording

    def _record_host(self, value, channel_axis: int):
        """Record one batch on the host; returns a token for the graph."""
        if self.capture_on:
            array = _as_numpy(value)
            if array.ndim >= 1 and array.size:
                self.record(array, channel_axis)
        return np.array(True)


# --------------------------------------------------------------------------- rebuild


def _is_functional(model) -> bool:
    try:
        from keras.src.models.functional import Functional
    except ImportError:  # pragma: no cover - other keras layouts
        return type(model).__name__ == "Functional" or hasattr(model, "_run_through_graph")
    return isinstance(model, Functional)


class _Builder:
    """Creates the StateCapture layers (names, stores) and inserts them into tensors."""

    def __init__(self, model, patterns, excluded, method, storage_path, keep_states, overwrite, channel_axes):
        self.overrides = {key: checked_type(key, axis) for key, axis in (channel_axes or {}).items()}
        self.patterns = patterns
        self.excluded = excluded
        self.methods = probe_methods(method)
        self.root = None if storage_path is None else Path(storage_path)
        self.keep_states = keep_states
        self.overwrite = overwrite
        self.taken = {layer.name for layer in model.layers if not isinstance(layer, BOUNDARIES)}
        self.taken |= {t.name for t in model.inputs}
        self.captures: list[StateCapture] = []
        self.captured: list = []  # the captures' output tensors (Functional models)
        self.store_dirs: set[str] = set()
        self.made: dict[tuple[str, str], StateCapture] = {}  # (layer name, method): its capture

    def wanted(self, name: str, class_name: str) -> bool:
        return matches_any(self.patterns, (name, class_name)) and not matches_any(self.excluded, (name, class_name))

    def make(self, label: str, class_name: str, method: str, axis: int = -1) -> StateCapture:
        """The StateCapture for ``method`` of layer ``label``: a new one with a unique
        name, or the one made for an earlier call of the same layer (one probe per
        layer, every call).

        Its neurons are on ``axis`` (see :func:`_output_axis` and :func:`_read_axis`),
        or where ``channel_axes`` says (keyed by capture name, ``"<layer>:<method>"``
        or layer name).
        """
        made = self.made.get((label, method))
        if made is not None:
            return made
        name = self.unique(f"{label}_states" if method == "after" else f"{label}_pre_states")
        disk_path = None if self.root is None else self.root / unique_store_dirname(name, self.store_dirs)
        key = self._override_key(name, label, method)
        if key is not None:
            axis = self.overrides[key]
        capture = StateCapture(
            name, disk_path, keep_states=self.keep_states, overwrite=self.overwrite,
            metadata={"layer": label, "layer_class": class_name}, channel_axis=axis, label=label,
            method=method,
        )  # fmt: skip
        self.captures.append(capture)
        self.made[(label, method)] = capture
        return capture

    def _override_key(self, name: str, label: str, method: str) -> str | None:
        """The ``channel_axes`` key that sets capture ``name``'s axis, if any."""
        return next((k for k in (name, f"{label}:{method}", label) if k in self.overrides), None)

    def unique(self, base: str) -> str:
        """``base``, or ``base_2``, ``base_3``... if a layer or input already has that name."""
        name, k = base, 2
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def check_overrides(self) -> None:
        """Raise ChannelAxisError for ``channel_axes`` keys that name no capture."""
        names = [c.name for c in self.captures]
        aliases = [k for c in self.captures for k in (c.label, f"{c.label}:{c.method}")]
        check_override_keys(self.overrides, names, aliases)

    def capture(self, tensor, label: str, class_name: str, method: str, axis: int = -1):
        """Apply the layer's StateCapture to ``tensor``; return its output. A later
        call of a shared layer whose tensor has its neurons on another axis than the
        first call's is recorded on its own axis, as on the other paths (DESIGN §1)."""
        capture = self.make(label, class_name, method, axis)
        rank = _rank(tensor)
        own_axis = (
            rank is not None
            and self._override_key(capture.name, label, method) is None
            and _last_as_minus_one(axis, rank) != _last_as_minus_one(capture._axis_config, rank)
        )
        output = capture(tensor, channel_axis=axis) if own_axis else capture(tensor)
        self.captured.append(output)
        return output

    def wrap_first(self, structure, label: str, class_name: str, method: str, axis_of):
        """``structure`` with its first tensor replaced by a captured one
        (``axis_of(tensor)``: the neuron axis to capture it on)."""
        flat = keras.tree.flatten(structure)
        for i, item in enumerate(flat):
            if isinstance(item, keras.KerasTensor):
                flat[i] = self.capture(item, label, class_name, method, axis_of(item))
                return keras.tree.pack_sequence_as(structure, flat)
        return structure


def _rebuild_functional(model, builder: _Builder):
    inputs_struct = model.input
    new_inputs = keras.tree.map_structure(
        lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name), inputs_struct
    )
    # Every layer reads the inputs through the PassBegin, and so runs after it;
    # probes on input layers (attach_to=["InputLayer"] or an input's name) too.
    flat_inputs = keras.tree.flatten(new_inputs)
    begun = PassBegin(name=builder.unique("tensorstate_pass_begin"))(flat_inputs)
    replaced: dict[int, object] = {}
    for tensor, read in zip(flat_inputs, begun, strict=True):
        if builder.wanted(tensor.name, "InputLayer"):
            read = builder.capture(read, tensor.name, "InputLayer", "after")
        replaced[id(tensor)] = read

    def substitute(structure):
        return keras.tree.map_structure(
            lambda t: replaced.get(id(t), t) if isinstance(t, keras.KerasTensor) else t, structure
        )

    axes: dict[int, int] = {}  # id of a tensor of the new graph: its neuron axis, where not the last

    def axis_of(tensor) -> int:
        return axes.get(id(tensor), -1)

    def call_function(layer, *args, **kwargs):
        args, kwargs = substitute(args), substitute(kwargs)
        if isinstance(layer, BOUNDARIES):
            return args[0]  # left out: the new model's own boundary covers every capture
        class_name = type(layer).__name__
        read = next((t for t in keras.tree.flatten((args, kwargs)) if isinstance(t, keras.KerasTensor)), None)
        wanted = builder.wanted(layer.name, class_name)
        if wanted and "before" in builder.methods:
            args, kwargs = builder.wrap_first(
                (args, kwargs), layer.name, class_name, "before", lambda t: _read_axis(layer, axis_of(t))
            )
        outputs = layer(*args, **kwargs)
        for output in keras.tree.flatten(outputs):
            if isinstance(output, keras.KerasTensor):
                axis = _output_axis(layer, axis_of(read), _rank(read), _rank(output))
                if axis != -1:
                    axes[id(output)] = axis
        if wanted and "after" in builder.methods:
            plain = keras.tree.flatten(outputs)
            outputs = builder.wrap_first(outputs, layer.name, class_name, "after", axis_of)
            for tensor, captured in zip(plain, keras.tree.flatten(outputs)):
                if captured is not tensor and id(tensor) in axes:
                    axes[id(captured)] = axes[id(tensor)]  # a capture passes its tensor on unchanged
        return outputs

    clone = keras.models.clone_model(
        model, input_tensors=new_inputs, clone_function=lambda layer: layer, call_function=call_function
    )
    # The outputs come out of the PassEnd, which follows every output and capture.
    outputs = clone.output
    ended = PassEnd(name=builder.unique("tensorstate_pass_end"))(keras.tree.flatten(outputs), builder.captured)
    rebuilt = type(clone)(new_inputs, keras.tree.pack_sequence_as(outputs, ended), name=model.name)
    rebuilt.output_names = list(model.output_names)  # not the PassEnd's name (losses and metrics use them)
    return rebuilt


def _rebuild_sequential(model, builder: _Builder):
    source = model.inputs[0]
    layers: list = [
        keras.Input(batch_shape=source.shape, dtype=source.dtype, name=source.name),
        PassBegin(name=builder.unique("tensorstate_pass_begin")),
    ]
    if builder.wanted(source.name, "InputLayer"):
        layers.append(builder.make(source.name, "InputLayer", "after"))
    axis, rank = -1, _rank(source)  # of the tensor between two layers
    for layer in model.layers:
        if isinstance(layer, BOUNDARIES):
            continue  # left out: the new model's own boundary covers every capture
        class_name = type(layer).__name__
        wanted = builder.wanted(layer.name, class_name)
        if wanted and "before" in builder.methods:
            layers.append(builder.make(layer.name, class_name, "before", _read_axis(layer, axis)))
        layers.append(layer)
        output_rank = _rank(getattr(layer, "output", None))
        axis, rank = _output_axis(layer, axis, rank, output_rank), output_rank
        if wanted and "after" in builder.methods:
            layers.append(builder.make(layer.name, class_name, "after", axis))
    layers.append(PassEnd(name=builder.unique("tensorstate_pass_end")))  # every capture is above it
    return keras.Sequential(layers, name=model.name, trainable=model.trainable)


def build_keras_efficiency_model(
    model,
    attach_to,
    exclude=(),
    method: str = "after",
    storage_path: str | os.PathLike | None = None,
    *,
    keep_states: bool = True,
    overwrite: bool = False,
    channel_axes: dict[str, int] | None = None,
):
    """A new Keras model with :class:`StateCapture` layers around the chosen layers.

    Args:
        model: a built Keras 3 ``Sequential`` or Functional model. Nested models
            are treated as single layers.
        attach_to: layer class names (``"Conv2D"``) or layer names; case-sensitive
            ``fnmatch`` globs allowed. ``"InputLayer"`` or an input's name probes
            a model input.
        exclude: patterns of the same kinds; a layer matching one is never probed
            (exclude wins over attach_to).
        method: ``"after"`` (the layer's first output), ``"before"`` (its first
            input) or ``"both"``.
        storage_path: directory under which each capture keeps its raw states,
            at ``<storage_path>/<capture name>``.
        keep_states: keep raw states in memory when there is no storage path
            (needed for ``states`` and ``counts(index=...)`` only).
        overwrite: allow a ``storage_path`` that is not empty: each probe replaces
            its store there, and once one has written, the stores an earlier run
            left there for other probes are deleted (other files stay).
        channel_axes: ``{probe: axis}`` overriding the neuron axis (the last one;
            axis 1 for ``channels_first`` layers). A probe is named by its capture
            name (``"dense_states"``), as ``"<layer>:<method>"`` or by its layer
            name (both methods).

    Returns:
        A new model of the same kind (Sequential for Sequential) that shares the
        given model's layers and weights, with ``efficiency_layers``: the
        StateCapture layers in model order, named ``<layer>_states`` (after) and
        ``<layer>_pre_states`` (before). A :class:`PassBegin` layer on the inputs
        and a :class:`PassEnd` layer on the outputs (``tensorstate_pass_begin`` /
        ``tensorstate_pass_end``) make the captures count a batch only when its
        forward pass reaches the outputs, so that a pass that raises midway
        leaves no probe with a batch the others lack; ``output_names`` stay the
        given model's (a copy loaded from a file derives them from the PassEnd
        layer instead, as Keras does). The given model is not changed. The compile configuration
        is copied when the model was compiled.

    Raises:
        TypeError: not a Keras model, or a subclassed model (use the ONNX path:
            ``build_efficiency_model(model, ..., runtime="onnxruntime")``).
        ValueError: an invalid ``method``, or the model has not been built.
        ChannelAxisError: a ``channel_axes`` key that names no probe, or an axis
            out of range for its tensor.
        ProbeDtypeError: a probe on an integer or bool tensor.
        ProbeMatchError: ``attach_to`` matched no layer (the message lists the
            layer names and classes), or everything matched is excluded.
        StorageExistsError: ``storage_path`` is a file, cannot be written, or is
            a directory that is not empty and ``overwrite`` is false.
    """
    if not isinstance(model, keras.Model):
        raise OptionTypeError(f"build_keras_efficiency_model takes a keras.Model, got {type(model).__name__}")
    probe_methods(method)
    if not model.built:
        raise ModelInputError(
            f"Keras model {model.name!r} is not built, so its layers have no shapes yet; "
            "build it first (model.build(input_shape), start it with keras.Input, or call it "
            "on a batch of data)"
        )
    sequential = isinstance(model, keras.Sequential)
    if not sequential and not _is_functional(model):
        raise OptionTypeError(
            f"{type(model).__name__} is a subclassed Keras model, whose layer graph cannot be "
            "rebuilt; use a Functional or Sequential model, or the ONNX path "
            "(build_efficiency_model(model, ..., runtime='onnxruntime'))"
        )
    patterns = as_patterns(attach_to, "attach_to")
    excluded = as_patterns(exclude, "exclude")
    if not patterns:
        raise ProbeMatchError("attach_to is empty; name at least one layer class or layer name")
    try:
        inputs = list(model.inputs or [])
    except (AttributeError, ValueError):
        inputs = []
    if sequential and not inputs:
        raise ModelInputError(
            f"Sequential model {model.name!r} has no defined input; start it with keras.Input "
            "or build it with model.build(input_shape)"
        )
    candidates = [(t.name, "InputLayer") for t in inputs]
    candidates += [(layer.name, type(layer).__name__) for layer in model.layers
                   if type(layer).__name__ != "InputLayer" and not isinstance(layer, BOUNDARIES)]  # fmt: skip
    matched = [c for c in candidates if matches_any(patterns, c)]
    if not matched:
        listing = [f"{name} ({cls})" for name, cls in candidates]
        classes = sorted({cls for _, cls in candidates})
        raise ProbeMatchError(
            f"attach_to {patterns} matched no layer of Keras model {model.name!r}. "
            f"Layer classes present: {', '.join(classes)}. Layers: {preview(listing, 30)}. "
            "Patterns are case-sensitive and may use * and ? wildcards."
        )
    if not [c for c in matched if not matches_any(excluded, c)]:
        raise ProbeMatchError(f"everything attach_to {patterns} matched is excluded by exclude {excluded}")

    if storage_path is not None:
        check_storage_root(storage_path, overwrite)
    builder = _Builder(model, patterns, excluded, method, storage_path, keep_states, overwrite, channel_axes)
    new_model = _rebuild_sequential(model, builder) if sequential else _rebuild_functional(model, builder)
    builder.check_overrides()
    sweep_stale_stores(builder.captures, storage_path, overwrite)
    if getattr(model, "compiled", False):
        try:
            config = model.get_compile_config()
            if isinstance(config, dict) and config.get("jit_compile"):
                config = {**config, "jit_compile": False}  # host callbacks cannot run under XLA
            new_model.compile_from_config(config)
        except Exception:  # noqa: BLE001 - a custom loss or metric may not round-trip
            pass
    if getattr(new_model, "compiled", False) and getattr(new_model, "jit_compile", False):
        new_model.jit_compile = False  # the StateCapture host callbacks cannot run under XLA
    # Plain attribute: tracking the captures again would list them twice in model.layers.
    object.__setattr__(new_model, "efficiency_layers", list(builder.captures))
    return new_model
