"""Accuracy: class ids, class scores, one-hot rows, and what is refused."""

import numpy as np
import pytest

from tensorstate_onnx import ModelInputError
from tensorstate_onnx.accuracy import check_class_labels, count_correct

SCORES = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]], np.float32)
LABELS = np.array([1, 0, 1, 0])  # the third prediction (2) is wrong


def test_scores_are_argmaxed_against_class_ids_or_one_hot_rows():
    assert count_correct(SCORES, LABELS) == (3, 4)
    assert count_correct(SCORES, LABELS.reshape(4, 1)) == (3, 4)
    assert count_correct(SCORES, np.eye(3, dtype=np.float32)[LABELS]) == (3, 4)
    assert count_correct(SCORES, LABELS.astype(np.float64)) == (3, 4)
    assert count_correct(SCORES.reshape(4, 3, 1, 1), LABELS) == (3, 4)  # a convolutional head


def test_integer_outputs_are_class_ids():
    ids = np.array([3, 1, 4, 1, 5], np.int64)
    assert count_correct(ids, ids) == (5, 5)
    assert count_correct(ids, [3, 1, 4, 1, 0]) == (4, 5)
    assert count_correct(ids.reshape(5, 1), ids) == (5, 5)


def test_per_token_labels_against_per_token_logits():
    logits = np.random.default_rng(0).normal(size=(2, 6, 11)).astype(np.float32)
    labels = logits.argmax(-1)
    labels[1, 2] = (labels[1, 2] + 1) % 11
    assert count_correct(logits, labels) == (11, 12)


@pytest.mark.parametrize(
    "output, labels, match",
    [
        (np.array([0.2, 0.9, 0.4], np.float32), [0, 1, 0], "one score per sample"),
        (np.array([[0.2], [0.9]], np.float32), [0, 1], "one score per sample"),
        (SCORES, np.array(["a", "b", "c", "d"]), "integer class ids"),
        (SCORES, np.array([0.5, 1, 0, 2]), "integer class ids"),
        (SCORES, np.array([1, 0, 3, 0]), r"labels run from 0 to 3.*3 classes"),
        (SCORES, np.array([1, 0, -1, 0]), "labels run from -1"),
        (SCORES, np.array([1, 0, 1]), r"labels of shape \(3\) fit neither"),
        (np.array(["x", "y"]), [0, 1], "class scores or integer class ids"),
    ],
    ids=["1-d scores", "[N, 1] scores", "string labels", "fractional labels", "label past the classes",
         "negative label", "too few labels", "string outputs"],
)  # fmt: skip
def test_ambiguous_or_mismatched_inputs_are_refused(output, labels, match):
    with pytest.raises(ModelInputError, match=match):
        count_correct(output, labels)


def test_a_prediction_with_a_nan_score_is_wrong_and_said_so():
    scores = SCORES.copy()
    scores[0, 2] = np.nan  # its argmax would be 2: wrong anyway
    scores[1, :] = np.nan  # argmax 0 would match its label 0
    with pytest.warns(RuntimeWarning, match="NaN among their class scores are counted as wrong"):
        assert count_correct(scores, LABELS) == (1, 4)


def test_padded_positions_are_not_checked_as_labels():
    logits = np.random.default_rng(1).normal(size=(2, 4, 5)).astype(np.float32)
    labels = logits.argmax(-1)
    real = np.ones((2, 4), bool)
    real[1, 2:] = False
    labels[1, 2:] = -100  # Hugging Face's padding label
    assert count_correct(logits, labels, real) == (6, 6)
    with pytest.raises(ModelInputError, match="labels run from -100"):
        count_correct(logits, labels)


def test_labels_are_checked_before_anything_runs():
    check_class_labels(LABELS, 3)
    check_class_labels(LABELS.astype(np.float32), None)
    check_class_labels(np.eye(3)[LABELS] * 0.9, 3)  # soft one-hot rows: argmaxed later
    check_class_labels(np.eye(3)[LABELS] * 0.9, None)  # ... also where the class count is not known
    check_class_labels(np.eye(3, dtype=bool)[LABELS], None)
    for labels, n_classes, match in [
        (np.array([1, 0, 3]), 3, r"labels run from 0 to 3, but the model's first output scores 3 classes"),
        (np.array([-1, 0]), None, None),
        (np.array([0.5, 1]), 3, "not whole numbers"),
        (np.array([np.nan, 1]), None, "not whole numbers"),
        (np.array(["a"]), 3, "integer class ids"),
        (3, 10, "one class id per sample .*single value"),
        ([[1, 2], [3]], 10, r"labels given as a list that is not one array .*pad ragged sequences; padded labels are -100"),
    ]:
        if match is None:
            check_class_labels(labels, n_classes)  # the class count unknown: ranges are checked per batch
            continue
        with pytest.raises(ModelInputError, match=match):
            check_class_labels(labels, n_classes)


def test_ragged_per_token_labels_are_refused_naming_the_padding():
    logits = np.zeros((2, 3, 5), np.float32)
    with pytest.raises(ModelInputError, match=r"labels given as a list that is not one array .*pad ragged"):
        count_correct(logits, [[1, 2, 3], [4]])
