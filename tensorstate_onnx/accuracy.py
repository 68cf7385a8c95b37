"""Which predictions are correct: the accuracy that aIQ weighs against efficiency.

One rule for every path: integer outputs are class ids; float outputs hold one
score per class on their last axis and the argmax is the prediction. Labels are
integer class ids shaped like the predictions, or one-hot rows shaped like the
scores. Anything else (one float score per sample, labels that are not class
ids of the outputs) is refused: an accuracy that silently compares the wrong
things would still look like a number.
"""

from __future__ import annotations

import warnings

import numpy as np

from .data import to_numpy
from .errors import ModelInputError

__all__ = ["check_class_labels", "count_correct"]


def _shape(array: np.ndarray) -> str:
    return "(" + ", ".join(str(d) for d in array.shape) + ")"


def _predictions(output: np.ndarray) -> np.ndarray:
    """Class ids predicted by one batch of the first output."""
    if output.dtype.kind in "ui":
        return output
    if output.dtype.kind != "f":
        raise ModelInputError(
            f"accuracy needs class scores or integer class ids from the model's first output, got {output.dtype}"
        )
    if output.ndim > 2:  # scores [N, K, 1, 1] of a convolutional head
        output = output.reshape(output.shape[0], *[d for d in output.shape[1:] if d != 1])
    if output.ndim < 2 or output.shape[-1] < 2:
        raise ModelInputError(
            f"the model's first output {_shape(output)} holds one score per sample, not one per class, so "
            "no class is predicted; evaluate a model that outputs class scores [N, K] (or integer class ids), "
            "or call predict() and score the outputs yourself"
        )
    predicted = output.argmax(axis=-1)
    # argmax lands on the first NaN of a row that has one: only the chosen scores need a look.
    unscored = np.isnan(np.take_along_axis(output, predicted[..., None], axis=-1)[..., 0])
    if unscored.any():
        # One message for every batch: Python shows it once, not once per batch.
        warnings.warn(
            "predictions with NaN among their class scores are counted as wrong (a NaN score predicts "
            "no class): the model overflowed, or its inputs hold NaN",
            RuntimeWarning,
            stacklevel=4,
        )
        predicted = np.where(unscored, -1, predicted)  # never a class id
    return predicted


def check_class_labels(labels, n_classes: int | None) -> None:
    """Refuse labels that cannot be class ids (of ``n_classes`` scored classes, when
    known) before any sample runs: a refusal after some batches ran would leave
    their states recorded. One-hot rows (a last axis of ``n_classes``) pass."""
    labels = to_numpy(labels, "labels")
    if labels.ndim == 0:
        raise ModelInputError(f"labels hold one class id per sample (an array), got the single value {labels!r}")
    if labels.ndim >= 2 and (n_classes is None or (n_classes > 1 and labels.shape[-1] == n_classes)):
        return  # one-hot (or soft) rows, or of a model whose class count is not known: checked with the outputs
    ids = _whole_ids(labels)
    if n_classes is not None:
        _check_in_classes(ids, n_classes)


def _whole_ids(labels: np.ndarray) -> np.ndarray:
    """``labels`` as integers (whole-number floats converted), or ``ModelInputError``."""
    if labels.dtype.kind == "f" and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
        return labels.astype(np.int64)
    if labels.dtype.kind not in "ui":
        got = f"{labels.dtype} values that are not whole numbers" if labels.dtype.kind == "f" else str(labels.dtype)
        raise ModelInputError(f"labels must be integer class ids (or one-hot rows), got {got}")
    return labels


def _check_in_classes(ids: np.ndarray, n_classes: int) -> None:
    if ids.size and (ids.min() < 0 or ids.max() >= n_classes):
        raise ModelInputError(
            f"labels run from {ids.min()} to {ids.max()}, but the model's first output scores "
            f"{n_classes} classes (0..{n_classes - 1}); pass class ids of the outputs"
        )


def _class_ids(labels: np.ndarray, output: np.ndarray, predicted: np.ndarray, real: np.ndarray | None) -> np.ndarray:
    """The labels as integer class ids shaped like ``predicted`` (those at positions
    ``real`` is false at, padding, are not checked)."""
    if labels.shape == output.shape and output.ndim >= 2 and output.shape[-1] > 1 and labels.shape != predicted.shape:
        return labels.argmax(axis=-1)  # one-hot rows
    if labels.shape != predicted.shape and labels.size == predicted.size and labels.shape[:1] == predicted.shape[:1]:
        labels = labels.reshape(predicted.shape)  # [N, 1] labels for [N] predictions
    if labels.shape != predicted.shape:
        raise ModelInputError(
            f"labels of shape {_shape(labels)} fit neither the predictions {_shape(predicted)} (class ids) "
            f"nor the scores {_shape(output)} (one-hot rows) of the model's first output"
        )
    labels = _whole_ids(labels)
    if output.dtype.kind == "f":
        _check_in_classes(labels if real is None else labels[real], output.shape[-1])
    return labels


def count_correct(output, labels, mask=None) -> tuple[int, int]:
    """``(correct, total)`` predictions of one batch of the model's first output against
    ``labels``; ``mask`` (true where real, shaped like per-token labels) leaves padded
    positions out."""
    output, labels = np.asarray(output), to_numpy(labels, "labels")
    predicted = _predictions(output)
    if output.dtype.kind == "f" and output.ndim > 2:
        output = output.reshape(*predicted.shape, -1)
    real = None if mask is None or np.shape(mask) != predicted.shape else np.asarray(mask, dtype=bool)
    ids = _class_ids(labels, output, predicted, real)
    right = predicted == ids
    if real is None:
        return int(np.count_nonzero(right)), int(ids.size)
    return int(np.count_nonzero(right & real)), int(np.count_nonzero(real))
