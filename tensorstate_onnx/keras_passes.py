"""Keras 3: where a forward pass of an efficiency model begins and ends.

:func:`~tensorstate_onnx.keras_capture.build_keras_efficiency_model` puts a
:class:`PassBegin` on the rebuilt model's inputs and a :class:`PassEnd` on its
outputs: its captures hold what they record until the pass ends, and a pass
that raised midway is dropped, with a warning, when the next one begins, so
that every probe holds the same batches. :class:`exporting` makes these layers
and the captures plain identities while a converter traces the model.

This module imports keras; ``import tensorstate_onnx`` never imports it.
"""

from __future__ import annotations

import threading
import warnings

import keras
import numpy as np

from .capture import AbstractStateCapture
from .patterns import preview

__all__ = ["BOUNDARIES", "PassBegin", "PassEnd", "exporting", "tracing_for_export"]

_TRACING = threading.local()  # set while a converter traces a model for export


def tracing_for_export() -> bool:
    """Whether a converter is tracing a model for export (inside :class:`exporting`)."""
    return getattr(_TRACING, "active", False)


class exporting:
    """Context manager: StateCapture, PassBegin and PassEnd layers traced inside it
    are plain identities (used by :func:`tensorstate_onnx.converters.from_keras`)."""

    def __enter__(self):
        self._previous = tracing_for_export()
        _TRACING.active = True
        return self

    def __exit__(self, *exc):
        _TRACING.active = self._previous
        return False


class _Pass:
    """What the :class:`PassBegin` and :class:`PassEnd` layers of one model share: the
    model's captures. A plain object, so that Keras does not track the captures as
    sublayers of the boundary layers."""

    def __init__(self, captures):
        self.captures = tuple(captures)

    def begin(self) -> None:
        """Drop what a pass that never ended left held (with a warning), then hold."""
        dropped = [capture.name for capture in self.captures if capture.drop()]
        if dropped:
            warnings.warn(
                f"a forward pass of the Keras efficiency model did not finish (it raised or was "
                f"interrupted); the batch that {len(dropped)} of its {len(self.captures)} probe(s) "
                f"({preview(dropped, 5)}) had recorded in it was dropped, so every probe still holds "
                "the same batches",
                RuntimeWarning,
                stacklevel=2,
            )
        for capture in self.captures:
            capture.hold()

    def end(self) -> None:
        """Count and store what every capture held during the pass."""
        for capture in self.captures:
            capture.commit()


def _after_host_call(callback, tensors: list, after: list) -> list:
    """``tensors`` unchanged, once ``callback()`` has run on the host after every
    tensor of ``after`` was computed.

    In a TensorFlow graph the callback is a ``tf.numpy_function`` run once
    ``after`` is computed, and the returned tensors depend on it (TensorFlow also
    runs a function's host callbacks in the order they were created, which orders
    passes that share one graph, as with ``steps_per_execution``); with JAX it is
    an ordered ``jax.debug.callback``; eager tensors (TensorFlow, torch, numpy
    backends) have been computed already, so it runs at once.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly():

            def host():
                callback()
                return np.array(True)

            with tf.control_dependencies(after):
                token = tf.numpy_function(host, [], Tout=tf.bool, stateful=True, name="pass_boundary")
            with tf.control_dependencies([token]):
                return [tf.identity(t) for t in tensors]
    elif backend == "jax":
        import jax

        jax.debug.callback(callback, ordered=True)
        return list(tensors)
    callback()
    return list(tensors)


def _spec_of(tensor) -> keras.KerasTensor:
    return keras.KerasTensor(tensor.shape, dtype=tensor.dtype, sparse=getattr(tensor, "sparse", False))


class _Boundary(keras.layers.Layer):
    """An identity layer that marks a pass boundary once linked to its model's captures."""

    def __init__(self, **kwargs):
        kwargs.setdefault("autocast", False)  # an identity must not cast its inputs
        super().__init__(**kwargs)
        self.supports_masking = True
        self.supports_jit = False  # the host callback cannot run under XLA
        self._pass: _Pass | None = None


@keras.saving.register_keras_serializable(package="tensorstate_onnx")
class PassBegin(_Boundary):
    """Identity on a model's inputs that marks where a forward pass begins.

    :func:`build_keras_efficiency_model` puts it first, so that every capture of
    the model runs after it (in a graph, the inputs the captures see depend on
    it). When a pass begins it drops what the captures still hold from a pass
    that never reached its :class:`PassEnd` (it raised or was interrupted
    midway), warning which probes had recorded that batch, then makes every
    capture hold what it records until the pass ends. It is linked to the
    captures when its model's :class:`PassEnd` is placed on the graph (also when a
    saved model is loaded); until then it is a plain identity.

    It assumes one pass of the model at a time, as ``predict``/``evaluate``/``fit``
    run them (the replicas of a ``MirroredStrategy`` too: TensorFlow runs a
    function's host callbacks in order); passes started from several Python
    threads at once would drop each other's batches.

    Called on a list of tensors it returns a list of the same tensors.
    """

    def call(self, inputs):
        if tracing_for_export() or self._pass is None:
            return inputs  # traced for ONNX export, or not part of an efficiency model
        flat = keras.tree.flatten(inputs)
        return keras.tree.pack_sequence_as(inputs, _after_host_call(self._pass.begin, flat, []))

    def compute_output_spec(self, inputs):
        return keras.tree.map_structure(_spec_of, inputs)

    def compute_mask(self, inputs, mask=None):
        return mask


@keras.saving.register_keras_serializable(package="tensorstate_onnx")
class PassEnd(_Boundary):
    """Identity on a model's outputs that marks where a forward pass ends.

    ``layer(outputs, captured)`` returns ``outputs`` unchanged once every
    tensor of ``outputs`` and ``captured`` (the captures' outputs) is computed
    and the captures have counted and stored the batches they held during the
    pass (see :class:`PassBegin`). When it is placed on a Keras graph it finds
    the model's :class:`PassBegin` and captures among the layers above it and
    links them, so a model rebuilt from its config (or loaded from a file)
    keeps the guard.
    """

    def call(self, inputs, captured=None):
        if tracing_for_export() or self._pass is None:
            return inputs  # traced for ONNX export, or not part of an efficiency model
        flat = keras.tree.flatten(inputs)
        after = flat + keras.tree.flatten(captured or [])
        return keras.tree.pack_sequence_as(inputs, _after_host_call(self._pass.end, flat, after))

    def compute_output_spec(self, inputs, captured=None):
        self._link(keras.tree.flatten(inputs) + keras.tree.flatten(captured or []))
        return keras.tree.map_structure(_spec_of, inputs)

    def compute_mask(self, inputs, previous_mask=None):
        return previous_mask  # Keras passes the masks of ``inputs`` (the first argument)

    def _link(self, tensors: list) -> None:
        """Share one :class:`_Pass` of the captures above ``tensors`` with the
        :class:`PassBegin` above them (Keras tensors carry the layers that made
        them); tensors of no Keras graph change nothing."""
        layers = _layers_above(tensors)
        begins = [layer for layer in layers if isinstance(layer, PassBegin)]
        if not begins:
            return
        shared = _Pass(layer for layer in layers if isinstance(layer, AbstractStateCapture))
        self._pass = shared
        for begin in begins:
            begin._pass = shared


#: The pass boundary layers. A model that is itself an efficiency model is rebuilt
#: without them (its captures are kept, as probed layers of the new model).
BOUNDARIES = (PassBegin, PassEnd)


def _layers_above(tensors: list) -> list:
    """The layers that computed ``tensors`` and every layer above them in their
    Keras graph (a nested model counts as one layer), roughly in model order."""
    found: list = []
    seen: set = set()
    stack = [t for t in tensors if isinstance(t, keras.KerasTensor)]
    while stack:
        history = getattr(stack.pop(), "_keras_history", None)
        if history is None or history.operation is None:
            continue
        key = (id(history.operation), history.node_index)
        if key in seen:
            continue
        seen.add(key)
        found.append(history.operation)
        stack.extend(history.operation._inbound_nodes[history.node_index].input_tensors)
    return found[::-1]
