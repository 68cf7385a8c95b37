"""Shard planning: split a dataset into the shards that Dask tasks analyze.

A shard says where its samples lie and how its task reads them: numpy slices
travel inside the task, ``.npy`` files and zarr arrays on shared storage are
opened by the task itself, dask arrays are one shard per chunk (computed on the
workers), and a callable data source yields the batches of shard ``i`` when
asked. Labels are split with the samples. Bad data (empty, a scalar, labels
that do not fit) fails here, before any cluster starts.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..data import check_labels, n_samples
from ..errors import ModelInputError, OptionError, OptionTypeError


@dataclass(frozen=True)
class _Shard:
    """One shard: where its samples lie and how a task reads them.

    ``kind`` is ``"array"`` (``source`` is the data, already sliced),
    ``"npy"`` (``source`` is a path), ``"zarr"`` (an array object or a
    path), ``"dask"`` (the data comes as a task argument) or ``"callable"``
    (``source(index)`` yields batches).
    """

    index: int
    start: int | None
    stop: int | None
    kind: str
    source: Any = None
    labels: np.ndarray | None = None

    @property
    def size(self) -> int | None:
        return None if self.start is None else self.stop - self.start

    @property
    def where(self) -> str:
        span = "" if self.start is None else f" (samples {self.start}..{self.stop - 1})"
        return f"shard {self.index}{span}"


def _sample_shape(inputs) -> Any:
    """The shape of one sample: a tuple, or sorted ``(name, shape)`` pairs for a dict of inputs."""
    if isinstance(inputs, dict):
        return tuple(sorted((name, tuple(np.shape(value)[1:])) for name, value in inputs.items()))
    return tuple(getattr(inputs, "shape", np.shape(inputs))[1:])


def _shape_text(shape) -> str:
    """A sample shape (see :func:`_sample_shape`) as error messages show it."""
    if shape and isinstance(shape[0], tuple):
        return "{" + ", ".join(f"{name!r}: {tuple(dims)}" for name, dims in shape) + "}"
    return str(tuple(shape))


def _is_dask_array(data) -> bool:
    return type(data).__module__.startswith("dask.array") and hasattr(data, "chunks")


def _is_zarr_array(data) -> bool:
    return type(data).__module__.startswith("zarr") and hasattr(data, "store") and hasattr(data, "shape")


def _default_shard_size(n: int, n_workers: int, batch_size: int, whole_batches: bool) -> int:
    """About four shards per worker, a multiple of ``batch_size`` when larger
    (always, with ``whole_batches``: a model whose batch size is fixed), at
    most 4096 samples or 4 batches."""
    size = max(1, math.ceil(n / (4 * max(1, n_workers))))
    if size > batch_size or whole_batches:
        size = math.ceil(size / batch_size) * batch_size
    top = max(4096, 4 * batch_size)
    return min(size, top - top % batch_size if whole_batches else top)


def _local_labels(labels, n: int) -> np.ndarray | None:
    """The labels as one numpy array (a dask array is computed here), one per sample of ``n``."""
    return None if labels is None else check_labels(labels, n)


def _plan_shards(data, labels, shard_size, n_shards, shard_sizes, n_workers, batch_size, whole_batches=False):
    """Split ``data`` into shards. Returns ``(shards, dask_blocks, total or None, sample shape)``.
    With ``whole_batches`` (the model's batch size is fixed to ``batch_size``)
    default shards hold whole batches."""
    if isinstance(data, tuple) and len(data) == 2 and not callable(data[0]):
        if labels is not None:
            raise ModelInputError("labels were given twice: inside (x, y) data and as labels=")
        data, labels = data
    if isinstance(data, (str, os.PathLike)):
        return _plan_path(Path(data), labels, shard_size, n_workers, batch_size, whole_batches)
    if callable(data) and not hasattr(data, "shape"):
        return _plan_callable(data, labels, n_shards, shard_sizes)
    if n_shards is not None or shard_sizes is not None:
        raise OptionError("n_shards and shard_sizes are for callable data sources; give shard_size for arrays")
    if _is_dask_array(data):
        return _plan_dask(data, labels, shard_size)
    if not isinstance(data, dict) and not (hasattr(data, "shape") and hasattr(data, "__getitem__")):
        raise OptionTypeError(
            f"cannot shard {type(data).__name__}; pass a numpy, dask or zarr array, a path of a "
            ".npy file or zarr array, or a callable shard_index -> iterable of batches with n_shards"
        )
    n, shape = int(n_samples(data)), _sample_shape(data)
    if n == 0:
        raise ModelInputError("the data holds no samples")
    labels = _local_labels(labels, n)
    size = shard_size or _default_shard_size(n, n_workers, batch_size, whole_batches)
    shards = []
    remote_zarr = _is_zarr_array(data) and type(data.store).__name__ != "MemoryStore"
    for index, start in enumerate(range(0, n, size)):
        stop = min(n, start + size)
        shard_labels = None if labels is None else labels[start:stop]
        if remote_zarr:  # each task opens and slices the array itself
            shards.append(_Shard(index, start, stop, "zarr", data, shard_labels))
        else:
            if isinstance(data, dict):
                part = {name: np.asarray(value[start:stop]) for name, value in data.items()}
            else:
                part = np.asarray(data[start:stop])
            shards.append(_Shard(index, start, stop, "array", part, shard_labels))
    return shards, None, n, shape


def _plan_path(path: Path, labels, shard_size, n_workers, batch_size, whole_batches):
    path = path.absolute()
    if path.is_dir():
        import zarr

        try:
            array = zarr.open_array(str(path), mode="r")
        except Exception as exc:
            raise ModelInputError(f"{path} is a directory but not a zarr array ({exc})") from None
        kind = "zarr"
    elif path.is_file():
        try:
            array = np.load(path, mmap_mode="r")
        except Exception as exc:
            raise ModelInputError(
                f"{path} is not a readable .npy file ({exc}); pass a .npy file or a zarr array directory"
            ) from None
        if not isinstance(array, np.ndarray):
            raise ModelInputError(
                f"{path} is not a single-array .npy file; load .npz archives first and pass their arrays"
            )
        kind = "npy"
    else:
        raise ModelInputError(f"data path {path} does not exist")
    if not array.shape:
        raise ModelInputError(f"{path} holds a scalar, not samples")
    n = int(array.shape[0])
    if n == 0:
        raise ModelInputError(f"{path} holds no samples")
    labels = _local_labels(labels, n)
    size = shard_size or _default_shard_size(n, n_workers, batch_size, whole_batches)
    shards = [
        _Shard(i, start, min(n, start + size), kind, str(path),
               None if labels is None else labels[start : min(n, start + size)])
        for i, start in enumerate(range(0, n, size))
    ]  # fmt: skip
    return shards, None, n, tuple(array.shape[1:])


def _plan_callable(function, labels, n_shards, shard_sizes):
    if labels is not None:
        raise ModelInputError(
            "labels= cannot be split for a callable data source; let it yield (x, y) batches"
        )
    if shard_sizes is not None:
        sizes = [int(s) for s in shard_sizes]
        if any(s < 0 for s in sizes):
            raise OptionError(f"shard_sizes must not be negative, got {list(shard_sizes)}")
        if n_shards is not None and n_shards != len(sizes):
            raise OptionError(f"n_shards={n_shards} but shard_sizes has {len(sizes)} entries")
        if sum(sizes) == 0:
            raise ModelInputError("the data holds no samples (every shard size is 0)")
        starts = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        shards = [_Shard(i, starts[i], starts[i + 1], "callable", function) for i in range(len(sizes))]
        return shards, None, int(starts[-1]), None
    if n_shards is None:
        raise OptionError("a callable data source needs n_shards (or shard_sizes): how many shards to ask it for")
    if isinstance(n_shards, bool) or not isinstance(n_shards, (int, np.integer)) or n_shards < 0:
        raise OptionError(f"n_shards must be a non-negative int, got {n_shards!r}")
    if n_shards == 0:
        raise ModelInputError("the data holds no samples (n_shards=0)")
    return [_Shard(i, None, None, "callable", function) for i in range(int(n_shards))], None, None, None


def _plan_dask(data, labels, shard_size):
    if data.ndim == 0:
        raise ModelInputError("data must have a batch axis; got a scalar")
    if data.ndim > 1:
        data = data.rechunk({axis: -1 for axis in range(1, data.ndim)})
    if shard_size:
        data = data.rechunk({0: shard_size})
    if any(isinstance(size, float) and math.isnan(size) for size in data.chunks[0]):
        raise ModelInputError("the dask array has unknown chunk sizes; call compute_chunk_sizes() first")
    n = int(data.shape[0])
    if n == 0:
        raise ModelInputError("the data holds no samples")
    labels = _local_labels(labels, n)
    blocks = data.to_delayed().reshape(-1)
    shards, delayed = [], []
    start = 0
    for size, block in zip(data.chunks[0], blocks):
        if size:
            stop = start + size
            shards.append(
                _Shard(len(shards), start, stop, "dask", None, None if labels is None else labels[start:stop])
            )
            delayed.append(block)
            start = stop
    return shards, delayed, n, tuple(data.shape[1:])
