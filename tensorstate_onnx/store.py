"""Zarr v3 storage of the raw packed states of one probe.

One array per probe, ``uint8 (n_states, n_bytes)``, Blosc-compressed (lz4,
bitshuffle), in memory or in a directory. Appends are buffered and written in
whole chunks, so a run of small batches does not recompress the same chunk
again and again; ``flush()`` writes the rest. The directory form keeps the
probe's metadata in the array's attributes, so a store can be reopened and
analyzed without the model.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from .engine import n_bytes_for
from .errors import IndexOutOfRangeError, MissingFileError, StorageExistsError, StoreError

__all__ = ["ChunkedRows", "StateStore", "state_codec", "store_dirname", "unique_store_dirname", "STATE_CHUNK_BYTES"]

STATE_CHUNK_BYTES = 4 << 20  # target size of one stored chunk


def state_codec() -> BloscCodec:
    """The compressor of every state store: packed bits compress best bit-shuffled."""
    return BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle, typesize=1)


def check_storage_root(root: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise ``StorageExistsError`` unless ``root`` can hold a run's state stores:
    it must not be a file, and an existing non-empty directory needs ``overwrite``."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise StorageExistsError(f"storage path {root} already exists and is not a directory; choose a new directory")
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise StorageExistsError(
            f"storage path {root} already exists and is not empty; choose a new directory, "
            "empty it, or pass overwrite=True (--overwrite on the command line)"
        )


def store_dirname(probe_name: str) -> str:
    """The directory name of a probe's store under a storage path (any front end)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", probe_name).strip("._") or "probe"


def unique_store_dirname(probe_name: str, taken: set[str]) -> str:
    """:func:`store_dirname` of ``probe_name``, suffixed ``_2``, ``_3``, ... past the
    names in ``taken``, which it joins: two probes whose names differ only in
    characters a folder name cannot hold still get stores of their own."""
    base = dirname = store_dirname(probe_name)
    k = 2
    while dirname in taken:
        dirname, k = f"{base}_{k}", k + 1
    taken.add(dirname)
    return dirname


class ChunkedRows:
    """Buffers appended rows and hands them to ``write`` in whole chunks.

    A compressed chunk is rewritten whole, so writing each small batch as it
    comes would recompress the same chunk again and again. Rows wait here until
    at least a chunk's worth is held; then every row up to the last chunk
    boundary goes out in one ``write(first_row, rows)``, and ``flush`` writes
    the rest. Rows are numbered from the writer's first row: ``written`` rows
    are there already (a reopened store, or one flushed mid-chunk), so the
    first write completes the chunk they end in.
    """

    def __init__(self, chunk_rows: int, write: Callable[[int, np.ndarray], None], written: int = 0):
        self.chunk_rows = int(chunk_rows)
        self.written = int(written)
        self.pending_rows = 0
        self._write = write
        self._pending: list[np.ndarray] = []

    def append(self, rows: np.ndarray) -> None:
        """Keep a copy of ``rows`` (the caller may reuse its buffer); write the whole chunks held."""
        if rows.shape[0] == 0:
            return
        self._pending.append(np.array(rows, copy=True))
        self.pending_rows += rows.shape[0]
        if self.pending_rows >= self.chunk_rows:
            data = np.concatenate(self._pending)
            aligned = (self.written + data.shape[0]) // self.chunk_rows * self.chunk_rows - self.written
            self._emit(data[:aligned])
            rest = data[aligned:]
            self._pending = [rest] if rest.shape[0] else []
            self.pending_rows = rest.shape[0]

    def flush(self) -> None:
        """Write every buffered row."""
        if self.pending_rows:
            self._emit(np.concatenate(self._pending))
            self._pending = []
            self.pending_rows = 0

    def _emit(self, data: np.ndarray) -> None:
        self._write(self.written, data)
        self.written += data.shape[0]


class StateStore:
    """Append-only store of packed states, one row per state."""

    def __init__(
        self,
        n_neurons: int,
        path: str | os.PathLike | None = None,
        metadata: dict | None = None,
        overwrite: bool = False,
    ):
        self.n_neurons = int(n_neurons)
        self.n_bytes = n_bytes_for(self.n_neurons)
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.check_free(self.path, overwrite)
            if self.path.is_dir():
                shutil.rmtree(self.path)
            elif self.path.exists():
                self.path.unlink()
        rows = max(1, STATE_CHUNK_BYTES // self.n_bytes)
        store = zarr.storage.MemoryStore() if self.path is None else zarr.storage.LocalStore(self.path)
        attributes = {"n_neurons": self.n_neurons, **(metadata or {})}
        self._array = zarr.create_array(
            store,
            shape=(0, self.n_bytes),
            chunks=(rows, self.n_bytes),
            dtype="uint8",
            compressors=[state_codec()],
            attributes=attributes,
            fill_value=0,
        )
        self._rows = ChunkedRows(rows, self._write)

    @staticmethod
    def check_free(path: str | os.PathLike, overwrite: bool = False) -> None:
        """Raise ``StorageExistsError`` if ``path`` exists and may not be replaced."""
        if Path(path).exists() and not overwrite:
            raise StorageExistsError(
                f"a state store already exists at {path}; choose another storage path, "
                "delete it, or pass overwrite=True to replace it"
            )

    @classmethod
    def open(cls, path: str | os.PathLike) -> "StateStore":
        """Reopen a directory store written earlier, for reading and appending."""
        path = Path(path)
        if not path.is_dir():
            raise MissingFileError(f"no state store at {path}: it is not a directory")
        try:
            array = zarr.open_array(zarr.storage.LocalStore(path), mode="r+")
        except Exception as exc:  # zarr raises several types for a directory that is not an array
            raise StoreError(f"{path} is not a tensorstate-onnx state store: {exc}") from None
        if "n_neurons" not in array.attrs or array.dtype != np.uint8 or array.ndim != 2:
            raise StoreError(f"{path} is a zarr array but not a tensorstate-onnx state store")
        self = cls.__new__(cls)
        self.n_neurons = int(array.attrs["n_neurons"])
        self.n_bytes = n_bytes_for(self.n_neurons)
        self.path = path
        self._array = array
        self._rows = ChunkedRows(array.chunks[0], self._write, written=array.shape[0])
        return self

    @property
    def metadata(self) -> dict:
        """The probe metadata kept with the states."""
        return dict(self._array.attrs)

    @property
    def array(self) -> zarr.Array:
        """The zarr array, with every buffered row written."""
        self.flush()
        return self._array

    def __len__(self) -> int:
        return self._array.shape[0] + self._rows.pending_rows

    def append(self, packed: np.ndarray) -> None:
        """Add rows; whole chunks are written at once, the rest waits for more or ``flush``."""
        if packed.ndim != 2 or packed.shape[1] != self.n_bytes or packed.dtype != np.uint8:
            raise StoreError(
                f"this store holds uint8 rows of {self.n_bytes} bytes, got {packed.dtype} {packed.shape}"
            )
        self._rows.append(packed)

    def _write(self, start: int, data: np.ndarray) -> None:
        # zarr silently drops writes past the end: grow the array first.
        self._array.resize((start + data.shape[0], self.n_bytes))
        self._array[start:] = data

    def flush(self) -> None:
        """Write every buffered row."""
        self._rows.flush()

    def read(self, rows: slice | np.ndarray | None = None) -> np.ndarray:
        """Stored rows: all, a slice, or an integer index array (in the order given)."""
        self.flush()
        if rows is None:
            return self._array[:]
        if isinstance(rows, slice):
            return self._array[rows]
        index = np.asarray(rows, dtype=np.int64)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            raise IndexOutOfRangeError(f"state rows must lie in [0, {len(self)}), got {index.min()}..{index.max()}")
        return self._array.get_orthogonal_selection((index, slice(None)))
