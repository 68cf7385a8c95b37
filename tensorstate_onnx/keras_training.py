"""Efficiency over Keras training: :class:`EfficiencyCallback`.

The callback measures through a separate model that
:func:`~tensorstate_onnx.keras_capture.build_keras_efficiency_model` builds from
the layers of the model being trained (so it always sees the current weights);
the trained model itself never gains a layer, and ``predict`` runs the layers
in inference mode, so no measurement changes a weight or a BatchNorm statistic.

This module imports keras; ``import tensorstate_onnx`` never imports it. It is
re-exported by :mod:`tensorstate_onnx.keras_capture`.
"""

from __future__ import annotations

from numbers import Integral

import keras
import numpy as np

from .accuracy import count_correct
from .capture import AbstractStateCapture
from .errors import ModelInputError, OptionError, OptionTypeError
from .history import EfficiencyHistory, EpochRecord, check_every, measured_record
from .metrics import check_aiq_weight
from .patterns import as_patterns, probe_methods

__all__ = ["EfficiencyCallback"]



class EfficiencyCallback(keras.callbacks.Callback):
    """A Keras callback measuring chosen layers on held-out data every N epochs.

    Args:
        attach_to: layer class names or layer names (globs allowed), as for
            :func:`~tensorstate_onnx.keras_capture.build_keras_efficiency_model`.
        data: held-out inputs, anything ``model.predict`` takes (an array
            ``[N, ...]``, a dict of arrays for several inputs).
        labels: class ids (or one-hot rows) for ``data``; ``None`` measures no
            accuracy and no aIQ.
        every: measure at the end of epoch ``epoch`` (Keras counts from 0) when
            ``epoch % every == 0``.
        method: ``"after"``, ``"before"`` or ``"both"``.
        aiq_weight: the aIQ weight (an int >= 1).
        batch_size: ``predict``'s batch size (``None``: Keras' default, 32).

    ``callback.history`` holds one
    :class:`~tensorstate_onnx.history.EpochRecord` per measurement (probes are
    named ``<layer>_states`` / ``<layer>_pre_states``). ``callback.measure(epoch)``
    measures by hand (after :meth:`set_model`, which ``fit`` calls).

    Raises:
        ProbeMatchError: (when training begins) ``attach_to`` matches no layer.
        OptionError: ``every`` is not an int >= 1, a bad ``method`` or ``aiq_weight``.
    """

    def __init__(
        self,
        attach_to,
        data,
        labels=None,
        every: int = 1,
        method: str = "after",
        aiq_weight: int = 2,
        batch_size: int | None = None,
    ):
        super().__init__()
        self.every = check_every(every)
        probe_methods(method)
        check_aiq_weight(aiq_weight)
        as_patterns(attach_to, "attach_to")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, Integral)
                                       or batch_size < 1):  # fmt: skip
            raise OptionError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
        if labels is not None:
            labels = np.asarray(labels)
            size = len(next(iter(data.values()))) if isinstance(data, dict) else len(data)
            if len(labels) != size:
                raise ModelInputError(f"{len(labels)} labels for {size} inputs")
        self.attach_to = attach_to
        self.data = data
        self.labels = labels
        self.method = method
        self.aiq_weight = aiq_weight
        self.batch_size = batch_size
        self.history = EfficiencyHistory()
        self._probed = None  # (trained model, its efficiency model)

    def _efficiency_model(self):
        from .keras_capture import build_keras_efficiency_model

        model = self.model
        if model is None:
            raise OptionError("the callback has no model yet: pass it to model.fit(callbacks=[...]) or set_model()")
        if self._probed is None or self._probed[0] is not model:
            probed = build_keras_efficiency_model(model, self.attach_to, method=self.method, keep_states=False)
            self._probed = (model, probed)
        return self._probed[1]

    def on_train_begin(self, logs=None):
        if self.model is not None and self.model.built:
            self._efficiency_model()  # ProbeMatchError before the first epoch, not after it
        # else fit builds the model on its first batch: it is probed at the first measurement

    def on_epoch_end(self, epoch, logs=None):
        self.measure(epoch)

    def measure(self, epoch: int) -> EpochRecord | None:
        """Measure after ``epoch`` if ``epoch % every == 0``; return the record (or ``None``)."""
        from .api import reset_efficiency_model

        if isinstance(epoch, bool) or not isinstance(epoch, Integral):
            raise OptionTypeError(f"epoch must be an int, got {epoch!r}")
        if epoch % self.every:
            return None
        probed = self._efficiency_model()
        reset_efficiency_model(probed)
        # Probes the trained model carries itself (it may be an efficiency model) stay in
        # the rebuilt one: they must not record the held-out data.
        own = {id(capture) for capture in probed.efficiency_layers}
        theirs = [*getattr(self.model, "efficiency_layers", ()), *probed.layers]
        paused = [
            layer for layer in theirs
            if isinstance(layer, AbstractStateCapture) and id(layer) not in own and layer.capture_on
        ]  # fmt: skip
        for capture in paused:
            capture.capture_on = False
        try:
            outputs = probed.predict(self.data, batch_size=self.batch_size, verbose=0)
        finally:
            for capture in paused:
                capture.capture_on = True
        efficiencies = {capture.name: capture.efficiency() for capture in probed.efficiency_layers}
        reset_efficiency_model(probed)  # hold no counts between measurements
        correct = total = 0
        if self.labels is not None:
            first = keras.tree.flatten(outputs)[0]
            correct, total = count_correct(np.asarray(first), self.labels)
        record = measured_record(epoch, efficiencies, correct, total, self.aiq_weight)
        self.history.append(record)
        return record

    def __repr__(self) -> str:
        return f"EfficiencyCallback(attach_to={self.attach_to!r}, every={self.every}, measured={self.history.epochs})"
