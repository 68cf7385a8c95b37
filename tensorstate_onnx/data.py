"""Turn the many shapes of user data into batches of numpy arrays.

Accepted: numpy arrays and array-likes that slice (zarr, dask, h5py, memory
maps), dicts of them (one entry per model input), ``(x, y)`` pairs, and
iterables of batches of any of these (generators, torch DataLoaders, tf.data
datasets). Framework tensors are recognised by duck typing, so no framework is
imported here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from .errors import ModelInputError, OptionError, OptionTypeError

__all__ = [
    "Batch", "cache_sized_batch", "check_labels", "iter_batches", "n_samples", "split_pair", "to_numpy",
    "CACHED_BATCH_BYTES", "DEFAULT_BATCH_SIZE",
]  # fmt: skip

DEFAULT_BATCH_SIZE = 256

#: Bytes of probe outputs a default batch holds at most on CPU: recording reads
#: them while they are still in cache (the exported MobileNetV2Small, 612 KB a
#: sample: 1,116/s at batch 16 and 1,083/s at 32, against 858/s at 256;
#: the default batch of 32 against 256 in another run, 1.11x).
CACHED_BATCH_BYTES = 24 << 20


def cache_sized_batch(bytes_per_sample: int | None) -> int:
    """:data:`DEFAULT_BATCH_SIZE`, halved until a batch of probe outputs of
    ``bytes_per_sample`` each fits in :data:`CACHED_BATCH_BYTES` (None or 0:
    not known, the default as it is)."""
    size = DEFAULT_BATCH_SIZE
    while bytes_per_sample and size > 1 and size * bytes_per_sample > CACHED_BATCH_BYTES:
        size //= 2
    return size


@dataclass
class Batch:
    """Inputs (an array or a dict of arrays) and, if known, their labels."""

    inputs: np.ndarray | dict[str, np.ndarray]
    labels: np.ndarray | None = None


def to_numpy(value, what: str = "data") -> np.ndarray:
    """A numpy view or copy of an array, torch tensor, TF tensor or array-like
    (``what`` it holds names it in the error when it is not one array)."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch.Tensor
        return value.detach().cpu().numpy()
    if hasattr(value, "numpy"):  # tf.Tensor, EagerTensor
        return value.numpy()
    try:
        return np.asarray(value)
    except ValueError as error:  # nested lists of unequal lengths, mixed types
        raise ModelInputError(
            f"{what} given as a {type(value).__name__} that is not one array ({error}); give lists of one length at every "
            "level (pad ragged sequences; padded labels are -100) or a numpy array"
        ) from None


def _is_array_like(value) -> bool:
    return hasattr(value, "shape") and hasattr(value, "__getitem__") and not isinstance(value, (dict, tuple, list))


def _is_pair(value) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and (_is_array_like(value[0]) or isinstance(value[0], dict))


def is_whole_data(value) -> bool:
    """Whether ``value`` is data :func:`iter_batches` splits into batches itself (an
    array, a dict of arrays, an ``(x, y)`` tuple of them), not an iterable of batches."""
    return _is_array_like(value) or isinstance(value, dict) or _is_pair(value)


def n_samples(inputs) -> int:
    """The number of samples in an array (its first axis) or a dict of arrays (one per input).

    Raises ``ModelInputError`` for a scalar, an empty dict, or inputs of different lengths.
    """
    if isinstance(inputs, dict):
        lengths = {name: len(value) for name, value in inputs.items()}
        if not lengths:
            raise ModelInputError("the input dict is empty; map each model input name to an array")
        if len(set(lengths.values())) != 1:
            raise ModelInputError(f"inputs have different numbers of samples: {lengths}")
        return next(iter(lengths.values()))
    if not getattr(inputs, "shape", ()):
        raise ModelInputError("data must have a batch axis; got a scalar")
    return inputs.shape[0]


def _slice(inputs, start: int, stop: int):
    if isinstance(inputs, dict):
        return {name: to_numpy(value[start:stop]) for name, value in inputs.items()}
    return to_numpy(inputs[start:stop])


def split_pair(item, single_input: bool):
    """Split ``item`` into (inputs, labels) when it is an ``(x, y)`` pair."""
    if isinstance(item, (tuple, list)) and len(item) == 2 and (single_input or isinstance(item[0], dict)):
        return item[0], item[1]
    if isinstance(item, (tuple, list)) and len(item) == 3:
        raise ModelInputError(
            "(x, y, sample_weight) batches are not supported: states are counted once per sample, so "
            "weights would apply to the accuracy alone; pass (x, y) pairs"
        )
    if isinstance(item, (tuple, list)):
        raise ModelInputError(
            f"a batch given as a {type(item).__name__} of {len(item)} items is ambiguous; pass an "
            "array, a dict of arrays (one per model input), or an (inputs, labels) pair"
        )
    return item, None


def _convert(inputs):
    if isinstance(inputs, dict):
        return {name: to_numpy(value) for name, value in inputs.items()}
    return to_numpy(inputs)


def check_labels(labels, n: int) -> np.ndarray:
    """``labels`` as a numpy array, one per sample of ``n``, or ``ModelInputError``."""
    labels = to_numpy(labels, "labels")
    if labels.ndim == 0 or labels.shape[0] != n:
        got = "a scalar" if labels.ndim == 0 else f"{labels.shape[0]} labels"
        raise ModelInputError(f"got {got} for {n} samples; give one label per sample")
    return labels


def iter_batches(data, labels=None, batch_size: int | None = None, single_input: bool = True) -> Iterator[Batch]:
    """Yield :class:`Batch` objects from ``data`` (see the module docstring).

    ``batch_size`` splits arrays (default :data:`DEFAULT_BATCH_SIZE`); batches
    that come from an iterable are used as they come. At the top level only a
    tuple is an ``(x, y)`` pair: a list is always a list of batches (items of an
    iterable may be ``[x, y]`` lists, as torch DataLoaders yield). ``labels`` may be given
    separately, one per sample. Raises ``ModelInputError`` for empty data and
    for labels whose length differs from the data's.
    """
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0):
        raise OptionError(f"batch_size must be a positive int, got {batch_size!r}")
    size = int(batch_size or DEFAULT_BATCH_SIZE)
    if _is_pair(data):
        if labels is not None:
            raise ModelInputError("labels were given twice: inside (x, y) data and as labels=")
        data, labels = split_pair(data, single_input)
    elif isinstance(data, tuple) and data and (_is_array_like(data[0]) or isinstance(data[0], dict)):
        split_pair(data, single_input)  # a triple or other tuple of arrays: refused there
    if _is_array_like(data) or isinstance(data, dict):
        n = n_samples(data)
        if n == 0:
            raise ModelInputError("the data holds no samples")
        if labels is not None:
            labels = check_labels(labels, n)
        # Read in blocks of at least the default size, then split: arrays that
        # decompress or compute a whole chunk for any slice (zarr, dask) are
        # not read once per small batch.
        read = max(size, DEFAULT_BATCH_SIZE)
        for first in range(0, n, read):
            last = min(n, first + read)
            block = _slice(data, first, last)
            for start in range(first, last, size):
                stop = min(last, start + size)
                piece = block if (start, stop) == (first, last) else _slice(block, start - first, stop - first)
                yield Batch(piece, None if labels is None else labels[start:stop])
        return
    if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
        raise OptionTypeError(
            f"cannot read batches from {type(data).__name__}; pass a numpy array, a dict of arrays, "
            "an (x, y) pair or an iterable of batches"
        )
    yield from _iter_stream(data, labels, single_input)


def _iter_stream(data, labels, single_input: bool) -> Iterator[Batch]:
    labels = None if labels is None else to_numpy(labels, "labels")
    used = 0
    for item in data:
        inputs, batch_labels = split_pair(item, single_input)
        inputs = _convert(inputs)
        n = n_samples(inputs)
        if labels is not None:
            if batch_labels is not None:
                raise ModelInputError("labels were given twice: inside the batches and as labels=")
            batch_labels = labels[used : used + n]
            if len(batch_labels) != n:
                raise ModelInputError(f"labels ran out after {used} samples; give one label per sample")
        elif batch_labels is not None:
            batch_labels = check_labels(batch_labels, n)
        used += n
        yield Batch(inputs, batch_labels)
    if used == 0:
        raise ModelInputError("the data holds no samples")
    if labels is not None and used != len(labels):
        raise ModelInputError(f"got {len(labels)} labels for {used} samples; give one label per sample")
