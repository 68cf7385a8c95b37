"""Efficiency over PyTorch training: :class:`EfficiencyTracker`, called once per epoch.

Each measurement attaches hooks, runs held-out data through the model in eval
mode under ``torch.no_grad()``, and removes the hooks again, restoring every
module's train/eval flag: between measurements the model being trained
carries no hooks, and no measurement changes its weights, buffers (BatchNorm
running statistics) or gradients.

This module imports torch; ``import tensorstate_onnx`` never imports it. It is
re-exported by :mod:`tensorstate_onnx.torch_capture`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from numbers import Integral

import numpy as np
import torch

from .accuracy import count_correct
from .errors import ModelInputError, OptionError, OptionTypeError
from .history import EfficiencyHistory, EpochRecord, check_every, measured_record
from .metrics import check_aiq_weight
from .patterns import probe_methods

__all__ = ["EfficiencyTracker"]



def _as_tensor(value) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class EfficiencyTracker:
    """Measures the efficiency of chosen modules of a model on held-out data during training.

    Args:
        model: the ``torch.nn.Module`` being trained.
        attach_to: module class names or qualified module names (globs allowed),
            as for :func:`~tensorstate_onnx.torch_capture.attach_hooks`.
        data: held-out inputs: an array or tensor ``[N, ...]`` (with ``labels``),
            or an iterable such as a ``DataLoader`` yielding ``(x, y)`` batches
            (or bare ``x`` batches: no accuracy). It is iterated once per
            measurement, so a loader must be re-iterable.
        labels: class ids (or one-hot rows) for an array ``data``; ``None``
            measures no accuracy and no aIQ.
        every: measure when ``epoch % every == 0``.
        method: ``"after"``, ``"before"`` or ``"both"``.
        aiq_weight: the aIQ weight (an int >= 1).
        batch_size: batch size for an array ``data`` (``None``: one batch).

    Call ``tracker.measure(epoch)`` (or ``tracker(epoch)``) at the end of each
    epoch; it returns the new :class:`~tensorstate_onnx.history.EpochRecord`,
    or ``None`` for an epoch it skips. ``tracker.history`` holds the records.

    Raises:
        ProbeMatchError: (when constructed) ``attach_to`` matches no module.
        OptionError: ``every`` is not an int >= 1, a bad ``method`` or ``aiq_weight``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        attach_to,
        data,
        labels=None,
        every: int = 1,
        method: str = "after",
        aiq_weight: int = 2,
        batch_size: int | None = None,
    ):
        from .torch_capture import match_modules

        if not isinstance(model, torch.nn.Module):
            raise OptionTypeError(f"EfficiencyTracker takes a torch.nn.Module, not {type(model).__name__}")
        self.every = check_every(every)
        probe_methods(method)
        check_aiq_weight(aiq_weight)
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, Integral)
                                       or batch_size < 1):  # fmt: skip
            raise OptionError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
        match_modules(model, attach_to)  # ProbeMatchError now, not after the first epoch
        is_array = isinstance(data, (torch.Tensor, np.ndarray))
        if not is_array and labels is not None:
            raise OptionError("labels go with an array or tensor of data; a data loader yields (x, y) batches")
        if not is_array and not isinstance(data, Iterable):
            raise OptionTypeError(
                f"data must be an array, a tensor or a DataLoader yielding (x, y), not {type(data).__name__}"
            )
        if is_array and labels is not None and len(labels) != len(data):
            raise ModelInputError(f"{len(labels)} labels for {len(data)} inputs")
        self.model = model
        self.attach_to = attach_to
        self.data = data
        self.labels = labels
        self.method = method
        self.aiq_weight = aiq_weight
        self.batch_size = batch_size
        self.history = EfficiencyHistory()

    def _batches(self) -> Iterator[tuple[torch.Tensor, object]]:
        if isinstance(self.data, (torch.Tensor, np.ndarray)):
            size = len(self.data) if self.batch_size is None else self.batch_size
            for start in range(0, len(self.data), max(size, 1)):
                labels = None if self.labels is None else self.labels[start : start + size]
                yield _as_tensor(self.data[start : start + size]), labels
            return
        for batch in self.data:
            if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):  # [x] of a TensorDataset(x), (x, y)
                yield _as_tensor(batch[0]), (batch[1] if len(batch) == 2 else None)
            elif isinstance(batch, (tuple, list, dict)):
                got = f"a {type(batch).__name__} of {len(batch)} items" if not isinstance(batch, dict) else "a dict"
                raise ModelInputError(
                    f"the data loader yielded {got}; the tracker takes batches x, [x] or (x, y) (model(x) "
                    "is what it measures): yield those, or wrap the loader in a generator that does"
                )
            else:
                yield _as_tensor(batch), None

    def _place(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` on the model's device, float inputs in the model's float dtype."""
        for param in self.model.parameters():
            dtype = param.dtype if x.is_floating_point() and param.is_floating_point() else None
            return x.to(device=param.device, dtype=dtype)
        return x

    def __call__(self, epoch: int) -> EpochRecord | None:
        return self.measure(epoch)

    def measure(self, epoch: int) -> EpochRecord | None:
        """Measure after ``epoch`` if ``epoch % every == 0``; return the record (or ``None``)."""
        from .torch_axes import first_tensor
        from .torch_capture import attach_hooks, remove_state_layers

        if isinstance(epoch, bool) or not isinstance(epoch, Integral):
            raise OptionTypeError(f"epoch must be an int, got {epoch!r}")
        if epoch % self.every:
            return None
        model = self.model
        if "efficiency_layers" in model.__dict__:
            raise OptionError(
                "the model carries probes attached by attach_hooks or build_efficiency_model; the tracker "
                "attaches its own for each measurement and would remove them: call remove_state_layers first"
            )
        modes = [(module, module.training) for module in model.modules()]
        correct = total = 0
        model.eval()
        try:
            attach_hooks(model, self.attach_to, method=self.method, keep_states=False)
            with torch.no_grad():
                for x, y in self._batches():
                    output = model(self._place(x))
                    if y is not None:
                        scores = first_tensor(output)
                        if scores is None:
                            raise ModelInputError("the model returned no tensor to score against the labels")
                        c, t = count_correct(_as_numpy(scores), _as_numpy(y))
                        correct, total = correct + c, total + t
            efficiencies = {hook.name: hook.efficiency() for hook in model.efficiency_layers}
        finally:
            remove_state_layers(model)
            for module, training in modes:
                module.training = training
        record = measured_record(epoch, efficiencies, correct, total, self.aiq_weight)
        self.history.append(record)
        return record

    def __repr__(self) -> str:
        return f"EfficiencyTracker(attach_to={self.attach_to!r}, every={self.every}, measured={self.history.epochs})"
