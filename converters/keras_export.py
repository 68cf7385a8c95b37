"""Keras 3 -> ONNX: :func:`from_keras` (TensorFlow backend, through tf2onnx).

``model.export(path, format="onnx")`` and ``tf2onnx.convert.from_function``
both let two optimizers merge layers: TensorFlow's grappler folds a
BatchNormalization's multiplication into the convolution before it
(``MulConvPushDown``), and tf2onnx's transpose optimizer folds the remaining
Mul/Add into the Conv, so the convolution layer's own output no longer exists.
Here the model is traced with every layer's output as an extra fetch, which
grappler must preserve, and converted with a transpose optimizer that never
folds Mul/Add into a Conv; only the model's real outputs become ONNX outputs.
Node names keep the layer names (``<model>_1/<layer>_1/<op>``) and node metadata
holds each layer's name and class, which is how ``attach_to`` finds Keras layers
and classes (``"Conv2D"``) in the ONNX model. Sequential, Functional and
subclassed models (with defined inputs) are accepted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import onnx
import onnx.numpy_helper

from tensorstate_onnx._optional import import_optional
from tensorstate_onnx.errors import OptionError, OptionTypeError
from tensorstate_onnx.graph.metadata import KERAS_LAYER_CLASS, KERAS_LAYER_CLASS_PATH, KERAS_LAYER_NAME

__all__ = ["from_keras"]


def _imports():
    return tuple(import_optional(name, "keras", "from_keras") for name in ("keras", "tensorflow", "tf2onnx"))


def _traced_model(keras, model, inputs: list):
    """``(model to trace, its input structure, number of real outputs)``.

    The model to trace shares the given model's layers and returns the real
    outputs first, then the output of every layer call: TensorFlow's grappler
    must keep fetched tensors, so it cannot fold one layer into another.
    It is built on fresh inputs, so that layers shared with other models (as
    in an efficiency model) contribute only this model's calls.
    """
    extras: list = []

    def keep(outputs) -> None:
        extras.extend(t for t in keras.tree.flatten(outputs) if isinstance(t, keras.KerasTensor))

    if isinstance(model, keras.Sequential):
        source = inputs[0]
        new_input = keras.Input(batch_shape=source.shape, dtype=source.dtype, name=source.name)
        x = new_input
        for layer in model.layers:
            x = layer(x)
            keep(x)
        outputs, structure, new_inputs = [x], new_input, [new_input]
    else:
        try:
            from keras.src.models.functional import Functional
        except ImportError:  # pragma: no cover
            Functional = ()
        if not isinstance(model, Functional):  # subclassed: trace the model as it is
            structure = inputs[0] if len(inputs) == 1 else inputs
            return model, structure, len(keras.tree.flatten(model.outputs))

        def call_function(layer, *args, **kwargs):
            out = layer(*args, **kwargs)
            keep(out)
            return out

        clone = keras.models.clone_model(
            model, clone_function=lambda layer: layer, call_function=call_function
        )
        outputs, structure, new_inputs = keras.tree.flatten(clone.outputs), clone.input, clone.inputs
    extras = [t for t in extras if all(t is not o for o in outputs)]
    traced = keras.Model(new_inputs, [*outputs, *extras], name=model.name)
    return traced, structure, len(outputs)


def _optimizers(tf2onnx):
    """tf2onnx's optimizers with a transpose optimizer that keeps Conv outputs apart."""
    try:
        from tf2onnx import optimizer
        from tf2onnx.optimizer.transpose_optimizer import TransposeOptimizer
    except ImportError:  # pragma: no cover - other tf2onnx layouts
        return None

    class LayerPreservingTransposeOptimizer(TransposeOptimizer):
        """Pushes transposes like tf2onnx does but never folds a following Mul/Add
        (another layer, e.g. BatchNormalization) into a Conv's weights or bias."""

        def _add_handler(self, trans, node):
            if trans.inputs[0].type in ("Conv", "ConvTranspose"):
                return self._handle_node_having_branches(trans, node)
            return super()._add_handler(trans, node)

        def _mul_handler(self, trans, node):
            if trans.inputs[0].type in ("Conv", "ConvTranspose"):
                return self._handle_node_having_branches(trans, node)
            return super()._mul_handler(trans, node)

    getter = getattr(optimizer, "_get_optimizers", None)
    if getter is None:  # pragma: no cover
        return None
    optimizers = dict(getter())
    if "optimize_transpose" in optimizers:
        optimizers["optimize_transpose"] = LayerPreservingTransposeOptimizer
    return optimizers


def _first_reason(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # Keras bolds parts of its messages
    text = " ".join(text.split())
    text = text or type(exc).__name__
    return text if len(text) <= 800 else text[:800] + " ..."


def _unique(names: list[str]) -> list[str]:
    seen: set[str] = set()
    result = []
    for name in names:
        base, k = name, 2
        while name in seen:
            name, k = f"{base}_{k}", k + 1
        seen.add(name)
        result.append(name)
    return result


def _constants_as_initializers(model: onnx.ModelProto, constants: dict) -> None:
    """Turn the graph inputs that hold captured constants into initializers, so
    that the model takes only the Keras model's inputs."""
    kept = [value for value in model.graph.input if value.name not in constants]
    used = {name for node in model.graph.node for name in node.input}
    found = {value.name for value in model.graph.input} & set(constants) & used
    del model.graph.input[:]
    model.graph.input.extend(kept)
    for name in sorted(found):  # constants folded away by the converter are dropped
        model.graph.initializer.append(onnx.numpy_helper.from_array(constants[name], name))


def _set_batch_dims(model: onnx.ModelProto) -> None:
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"


_SCOPE_SUFFIX = re.compile(r"_\d+$")


def _annotate_layers(proto: onnx.ModelProto, model) -> None:
    """Tag each node with the Keras layer (name, class and class path) its name scope belongs to,
    under the keys of :mod:`tensorstate_onnx.graph.metadata`, where the rewriter reads them.

    tf2onnx names nodes ``<model scope>/<layer scope>/<op...>``; TensorFlow
    appends ``_<n>`` to a scope to keep it unique, and under Keras 3 to every
    layer's scope (layer ``conv`` is ``conv_1``, layer ``conv_1`` then
    ``conv_1_2``). When every scope carries such a suffix it is stripped first, so
    ``conv_1`` is layer ``conv`` even where a layer ``conv_1`` exists; otherwise
    a scope that is a layer's name is that layer. Nodes outside any layer scope
    (added by the converter) are left alone.
    """
    layers = {layer.name: layer for layer in model.layers}
    scoped = []
    for node in proto.graph.node:
        parts = [part for part in node.name.split("/") if part and part != "StatefulPartitionedCall"]
        if len(parts) >= 3:
            scoped.append((node, parts[1]))
    all_suffixed = bool(scoped) and all(_SCOPE_SUFFIX.search(scope) for _, scope in scoped)
    for node, scope in scoped:
        bare = layers.get(_SCOPE_SUFFIX.sub("", scope))
        layer = (bare or layers.get(scope)) if all_suffixed else (layers.get(scope) or bare)
        if layer is None:
            continue
        cls = type(layer)
        existing = {prop.key for prop in node.metadata_props}
        for key, value in (
            (KERAS_LAYER_NAME, layer.name),
            (KERAS_LAYER_CLASS, cls.__name__),
            (KERAS_LAYER_CLASS_PATH, f"{cls.__module__}.{cls.__qualname__}"),
        ):
            if key not in existing:
                entry = node.metadata_props.add()
                entry.key, entry.value = key, value


def from_keras(model, path: str | os.PathLike | None = None, opset: int = 17) -> onnx.ModelProto:
    """Convert a Keras 3 model (TensorFlow backend) to ONNX, keeping every layer's output.

    Args:
        model: a built ``keras.Model`` (Sequential, Functional, or subclassed with
            defined inputs). StateCapture layers in it become identities.
        path: also write the model there. Without a path nothing is written.
        opset: ONNX opset version of the default domain.

    Returns:
        The ``onnx.ModelProto``: inputs named like the Keras inputs, outputs like
        the Keras outputs, a dynamic batch axis ``batch``, node names
        ``<model>_1/<layer>_1/<op>`` and the layer's name and class in the node
        metadata (:data:`~tensorstate_onnx.graph.metadata.KERAS_LAYER_NAME`, :data:`~tensorstate_onnx.graph.metadata.KERAS_LAYER_CLASS`), no BatchNorm
        folded into a convolution.

    Raises:
        TypeError: ``model`` is not a Keras model.
        ValueError: the model is not built, the backend is not TensorFlow, or the
            conversion failed (the message carries tf2onnx's reason).
    """
    keras, tf, tf2onnx = _imports()
    if not isinstance(model, keras.Model):
        raise OptionTypeError(f"from_keras takes a keras.Model, got {type(model).__name__}")
    if keras.backend.backend() != "tensorflow":
        raise OptionError(
            f"from_keras converts through TensorFlow, but Keras runs on the "
            f"{keras.backend.backend()!r} backend; set KERAS_BACKEND=tensorflow"
        )
    if not model.built:
        raise OptionError(
            f"Keras model {model.name!r} is not built; build it first (model.build(input_shape), "
            "start it with keras.Input, or call it on a batch of data)"
        )
    try:
        inputs = list(model.inputs or [])
    except (AttributeError, ValueError):
        inputs = []
    if not inputs:
        raise OptionError(
            f"Keras model {model.name!r} has no defined inputs; build it with keras.Input "
            "(Functional/Sequential) so that the input shapes are known"
        )
    from tensorstate_onnx.keras_passes import exporting

    try:
        traced, structure, n_out = _traced_model(keras, model, inputs)
    except Exception as exc:
        raise OptionError(
            f"could not rebuild Keras model {model.name!r} for tracing: "
            f"{type(exc).__name__}: {_first_reason(exc)}"
        ) from exc
    input_names = _unique([re.sub(r":\d+$", "", t.name) for t in inputs])
    raw_names = getattr(model, "output_names", None) or []
    if not raw_names and isinstance(model, keras.Sequential) and model.layers:
        raw_names = [model.layers[-1].name]
    output_names = _unique(
        list(raw_names)[:n_out] if len(raw_names) >= n_out else [f"output_{i}" for i in range(n_out)]
    )
    specs = [tf.TensorSpec(t.shape, t.dtype, name=name) for t, name in zip(inputs, input_names)]

    @tf.function(input_signature=specs, autograph=False)
    def forward(*xs):
        args = keras.tree.pack_sequence_as(structure, list(xs))
        return keras.tree.flatten(traced(args, training=False))

    try:
        from tf2onnx import tf_loader
        from tf2onnx.convert import _convert_common

        with exporting():
            concrete = forward.get_concrete_function()
        # After the model's own inputs come the tensors the trace captured:
        # variables (frozen into weights) and constants such as a Normalization
        # layer's mean, which become initializers below instead of inputs.
        captures = list(zip(concrete.inputs[len(specs):], concrete.captured_inputs))
        constants = {t.name: value.numpy() for t, value in captures if t.dtype != tf.resource}
        tf_inputs = [t.name for t in concrete.inputs[: len(specs)]] + list(constants)
        tf_outputs = [t.name for t in concrete.outputs]
        real = tf_outputs[:n_out]
        # Every layer output is a fetch for grappler, so no layer is folded into another.
        frozen = tf_loader.from_function(concrete, tf_inputs, tf_outputs)
        rename = dict(zip(tf_inputs, input_names))
        rename.update(zip(real, output_names))
        proto, _ = _convert_common(
            frozen, name=model.name, continue_on_error=False, opset=opset,
            input_names=tf_inputs, output_names=real, tensors_to_rename=rename,
            optimizers=_optimizers(tf2onnx),
        )  # fmt: skip
    except Exception as exc:
        raise OptionError(
            f"could not convert Keras model {model.name!r} to ONNX with tf2onnx: "
            f"{type(exc).__name__}: {_first_reason(exc)}"
        ) from exc
    unsupported = sorted(
        {node.op_type for node in proto.graph.node
         if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)}
    )  # fmt: skip
    if unsupported:
        raise OptionError(
            f"could not convert Keras model {model.name!r} to ONNX: tf2onnx has no conversion for "
            f"the TensorFlow op(s) {', '.join(unsupported)} (e.g. tf.numpy_function/py_function "
            "or custom ops); replace them with TensorFlow/Keras ops"
        )
    _constants_as_initializers(proto, constants)
    _set_batch_dims(proto)
    _annotate_layers(proto, model)
    try:
        if proto.ByteSize() < 2**31 - 2**27:  # larger models cannot be checked in memory
            onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise OptionError(
            f"tf2onnx produced an invalid ONNX model for {model.name!r}: {_first_reason(exc)}"
        ) from exc
    if path is not None:
        from tensorstate_onnx.graph import save_model

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_model(proto, path)
    return proto
