"""Zarr v3 storage of the raw packed states of one probe.

One array per probe, ``uint8 (n_states, n_bytes)``, Blosc-compressed (lz4,
bitshuffle), in a directory or in memory. On disk, appends are buffered and
written in whole chunks, so a run of small batches does not recompress the
same chunk again and again; ``flush()`` writes the rest. The directory form
keeps the probe's metadata in the array's attributes, so a store can be
reopened and analyzed without the model.

In memory the rows are kept as they come, uncompressed (``n_bytes`` per
state), in chunks filled in place: an append costs one copy of the packed
bytes and nothing else, so keeping states does not slow the forward pass.
The compressed zarr array is built only when :attr:`StateStore.array` is asked
for (and brought up to date with later appends the next time); reads never
need it. A run that should keep more states than memory holds gives a path.

Integrity: the attribute ``rows_written`` counts the rows completely written,
and is raised only after their chunks are on disk; ``complete`` is set only by
``mark_complete`` at the end of a run and cleared by the next append. A store
left by a run that stopped early (exception, kill -9, full disk) reopens with
exactly its first ``rows_written`` rows and ``complete`` false: rows past the
count, whose chunks may be missing (zeros) or half-replaced, are dropped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import zarr
from zarr.codecs import BloscCodec, BloscShuffle

from .engine import n_bytes_for
from .engine.packing import check_packed
from .errors import IndexOutOfRangeError, MissingFileError, OptionError, OptionTypeError, StorageExistsError, StoreError

log = logging.getLogger(__name__)

__all__ = ["ChunkedRows", "MemoryRows", "StaleStoreSweep", "StateStore", "state_codec", "store_dirname", "unique_store_dirname", "STATE_CHUNK_BYTES"]

STATE_CHUNK_BYTES = 4 << 20  # target size of one stored chunk
ROWS_WRITTEN = "rows_written"  # attribute: rows completely written
COMPLETE = "complete"  # attribute: the run that wrote the store finished
# Attribute: every chunk is written, all-zero ones too (zarr skips those by
# default, and reads any absent chunk as zeros): an absent chunk is then a lost
# one, refused on reading instead of read as states where no neuron fired.
EVERY_CHUNK = "every_chunk_written"
_EVERY_CHUNK_CONFIG = {"write_empty_chunks": True}


def writing_every_chunk(array: zarr.Array) -> zarr.Array:
    """``array`` set to write all-zero chunks too (a setting of the process, not of the file)."""
    return array.with_config(_EVERY_CHUNK_CONFIG)


def state_codec() -> BloscCodec:
    """The compressor of every state store: packed bits compress best bit-shuffled."""
    return BloscCodec(cname="lz4", clevel=5, shuffle=BloscShuffle.bitshuffle, typesize=1)


def check_storage_root(root: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise ``StorageExistsError`` unless ``root`` can hold a run's state stores:
    it must not be a file, and an existing non-empty directory needs ``overwrite``."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise StorageExistsError(f"storage path {root} already exists and is not a directory; choose a new directory")
    ancestor = _existing_ancestor(root, "storage path")
    if ancestor is not None and not os.access(ancestor if not root.exists() else root, os.W_OK):
        raise StorageExistsError(f"storage path {root} cannot be written (permission denied); choose another directory")
    if root.exists() and any(root.iterdir()) and not overwrite:
        raise StorageExistsError(
            f"storage path {root} already exists and is not empty; choose a new directory, "
            "empty it, or pass overwrite=True (--overwrite on the command line)"
        )


def _existing_ancestor(path: Path, what: str) -> Path | None:
    """The nearest existing folder above ``path``; ``StorageExistsError`` when it is a file
    (a directory cannot be made there)."""
    ancestor = next((p for p in path.absolute().parents if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        raise StorageExistsError(f"{what} {path} lies under {ancestor}, which is a file; choose a directory path")
    return ancestor


class StaleStoreSweep:
    """Deletes, once, the state stores under a storage path that no probe of a run
    writes, for a run told to overwrite: an earlier run's store of a probe this one
    no longer has would otherwise sit beside the new stores, marked complete. The
    run's captures call :meth:`sweep` when they create their stores, so a run that
    fails before writing anything deletes nothing; what is not a state store stays."""

    def __init__(self, root: str | os.PathLike, keep: Iterable[str]):
        self.root = Path(root)
        self.keep = frozenset(keep)
        self._lock = threading.Lock()
        self._done = False

    def sweep(self) -> None:
        """Delete the stale stores, the first time only (safe from several threads)."""
        with self._lock:
            if not self._done:
                self._done = True
                remove_state_stores(self.root, self.keep)


def remove_state_stores(root: str | os.PathLike, keep: set[str] = frozenset()) -> list[str]:
    """Delete the state stores directly under ``root`` but those named in ``keep``,
    and return their names; anything else in it stays. A run told to overwrite a
    storage path calls this once it has written there: a store of an earlier run
    that it does not write again (a probe it no longer has) would otherwise sit
    beside its own, marked complete."""
    removed = []
    root = Path(root)
    for entry in sorted(root.iterdir()) if root.is_dir() else ():
        if entry.name in keep:
            continue
        metadata = entry / "zarr.json"
        if entry.is_dir() and not entry.is_symlink() and metadata.is_file():
            try:
                attributes = json.loads(metadata.read_text()).get("attributes", {})
            except (OSError, ValueError, AttributeError):
                continue
            if isinstance(attributes, dict) and "n_neurons" in attributes:
                shutil.rmtree(entry)
                removed.append(entry.name)
    return removed


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


class MemoryRows:
    """Rows kept in memory, uncompressed, in chunks of ``chunk_rows`` rows.

    A chunk is allocated whole and filled by copying appended rows into it,
    so an append is one copy and a read of any rows needs no decoding. A
    chunk is laid out as a chunk of the store's zarr array, which
    :meth:`StateStore.array` fills from it.
    """

    def __init__(self, chunk_rows: int, n_bytes: int):
        self.chunk_rows = int(chunk_rows)
        self.n_bytes = int(n_bytes)
        self.rows = 0
        self.chunks: list[np.ndarray] = []

    def append(self, rows: np.ndarray) -> None:
        """Copy ``rows`` in (the caller may reuse its buffer)."""
        done = 0
        while done < rows.shape[0]:
            at = self.rows % self.chunk_rows
            if at == 0:  # untouched pages of a fresh chunk take no memory yet
                self.chunks.append(np.empty((self.chunk_rows, self.n_bytes), np.uint8))
            take = min(self.chunk_rows - at, rows.shape[0] - done)
            self.chunks[-1][at : at + take] = rows[done : done + take]
            done += take
            self.rows += take

    def span(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop`` (a new array)."""
        pieces = []
        while start < stop:
            chunk, at = divmod(start, self.chunk_rows)
            take = min(self.chunk_rows - at, stop - start)
            pieces.append(self.chunks[chunk][at : at + take])
            start += take
        return np.concatenate(pieces) if pieces else np.empty((0, self.n_bytes), np.uint8)

    def take(self, index: np.ndarray) -> np.ndarray:
        """The rows at ``index`` (in ``[0, rows)``), in the order given."""
        which, at = np.divmod(index, self.chunk_rows)
        out = np.empty((index.size, self.n_bytes), np.uint8)
        for chunk in np.unique(which):
            picked = which == chunk
            out[picked] = self.chunks[chunk][at[picked]]
        return out


class StateStore:
    """Append-only store of packed states, one row per state, in a directory or in memory."""

    def __init__(
        self,
        n_neurons: int,
        path: str | os.PathLike | None = None,
        metadata: dict | None = None,
        overwrite: bool = False,
    ):
        if _positive_int(n_neurons) is None:
            raise OptionError(f"a state store holds states of a positive int number of neurons, got {n_neurons!r}")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise OptionTypeError(f"a state store's path is a str or os.PathLike (None: in memory), not {type(path).__name__}")
        self.n_neurons = int(n_neurons)
        self.n_bytes = n_bytes_for(self.n_neurons)
        self.path = None if path is None else Path(path)
        if self.path is not None:
            self.check_free(self.path, overwrite)
            _existing_ancestor(self.path, "state store path")
            if self.path.is_dir():
                shutil.rmtree(self.path)
            elif self.path.exists():
                self.path.unlink()
        rows = max(1, STATE_CHUNK_BYTES // self.n_bytes)
        attributes = {
            "n_neurons": self.n_neurons, **(metadata or {}), ROWS_WRITTEN: 0, COMPLETE: False, EVERY_CHUNK: True,
        }  # fmt: skip
        # In memory: the rows themselves, the zarr array built when asked for.
        self._memory = MemoryRows(rows, self.n_bytes) if self.path is None else None
        self._attributes = attributes
        self._array = self._rows = None
        if self.path is not None:
            self._array = _new_array(zarr.storage.LocalStore(self.path), rows, self.n_bytes, attributes)
            self._rows = ChunkedRows(rows, self._write)
        self._complete = False
        self._regions: list[tuple[int, int]] = []  # written regions past the first gap (sharded runs)

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
        """Reopen a directory store written earlier, for reading and appending.

        Only the rows the store says were completely written are kept: the
        tail a stopped run may have left is cut off. Metadata that contradicts
        the array (row width, row count) is refused.
        """
        path = Path(path)
        if not path.is_dir():
            raise MissingFileError(f"no state store at {path}: it is not a directory")
        try:
            array = writing_every_chunk(zarr.open_array(zarr.storage.LocalStore(path), mode="r+"))
        except Exception as exc:  # zarr raises several types for a directory that is not an array
            raise StoreError(f"{path} is not a tensorstate-onnx state store: {exc}") from None
        if "n_neurons" not in array.attrs or array.dtype != np.uint8 or array.ndim != 2:
            raise StoreError(f"{path} is a zarr array but not a tensorstate-onnx state store")
        n_neurons = _positive_int(array.attrs["n_neurons"])
        if n_neurons is None or n_bytes_for(n_neurons) != array.shape[1]:
            raise StoreError(
                f"state store {path} is inconsistent: its n_neurons attribute is "
                f"{array.attrs['n_neurons']!r}, but its rows are {array.shape[1]} bytes wide "
                f"({array.shape[1] * 8 - 7} to {array.shape[1] * 8} neurons); it was altered or damaged"
            )
        rows = _rows_written(array, path)
        if rows < array.shape[0] and "n_shards" not in array.attrs:  # sharded stores are sized up front
            log.warning("state store %s: dropping %d rows past the %d completely written", path, array.shape[0] - rows, rows)
            array.resize((rows, array.shape[1]))
        self = cls.__new__(cls)
        self.n_neurons = n_neurons
        self.n_bytes = array.shape[1]
        self.path = path
        self._memory = None
        self._array = array
        self._rows = ChunkedRows(array.chunks[0], self._write, written=rows)
        self._complete = bool(array.attrs.get(COMPLETE, False))
        self._regions = _shard_regions(array) if rows < array.shape[0] else []
        return self

    @property
    def metadata(self) -> dict:
        """The probe metadata kept with the states."""
        if self._memory is not None:
            return {**self._attributes, ROWS_WRITTEN: self._memory.rows, COMPLETE: self._complete}
        return dict(self._array.attrs)

    @property
    def array(self) -> zarr.Array:
        """The zarr array, with every buffered row written (in memory: built, or
        brought up to date, from the rows kept)."""
        if self._memory is not None:
            return self._memory_array()
        self.flush()
        if self._array.shape[0] != self._rows.written:
            raise StoreError(
                f"state store {self.path} holds only its first {self._rows.written} of "
                f"{self._array.shape[0]} rows (its run stopped early); read them with read()"
            )
        if self._array.shape[0]:
            self._check_chunks_present(np.arange(-(-self._array.shape[0] // self._array.chunks[0])))
        return self._array

    @property
    def complete(self) -> bool:
        """Whether the run that wrote the store marked it finished (and nothing was appended since)."""
        return self._complete

    @property
    def rows_written(self) -> int:
        """Rows on disk for good: buffered rows are not counted (in memory: every row)."""
        return self._rows.written if self._memory is None else self._memory.rows

    def __len__(self) -> int:
        if self._memory is not None:
            return self._memory.rows
        return self._rows.written + self._rows.pending_rows

    def append(self, packed: np.ndarray) -> None:
        """Add rows; whole chunks are written at once, the rest waits for more or ``flush``."""
        if not isinstance(packed, np.ndarray):
            raise OptionTypeError(f"a state store appends a numpy array of packed states, not {type(packed).__name__}")
        if packed.ndim != 2 or packed.shape[1] != self.n_bytes or packed.dtype != np.uint8:
            raise StoreError(
                f"this store holds uint8 rows of {self.n_bytes} bytes, got {packed.dtype} {packed.shape}"
            )
        # Bits above the last neuron would be read back as states of their own (a few us a batch).
        check_packed(packed, self.n_neurons, "StateStore.append()")
        self._append_valid(packed)

    def _append_valid(self, packed: np.ndarray) -> None:
        """:meth:`append` of rows already checked as this store's packed states (a
        capture's, which its counter checked): the hot path checks them once."""
        if self._memory is not None:
            self._memory.append(packed)
            if packed.shape[0]:
                self._complete = False
            return
        if self._complete and packed.shape[0]:
            self._array.update_attributes({COMPLETE: False})
            self._complete = False
        self._rows.append(packed)

    def _memory_array(self) -> zarr.Array:
        """The zarr array of an in-memory store: created on first use, then given the
        rows appended since (whole chunks, as the memory holds them)."""
        memory = self._memory
        if self._array is None:
            self._array = _new_array(zarr.storage.MemoryStore(), memory.chunk_rows, self.n_bytes, self._attributes)
        start, rows, per_chunk = self._array.shape[0], memory.rows, memory.chunk_rows
        if start != rows:
            self._array.resize((rows, self.n_bytes))
            for chunk in range(start // per_chunk, -(-rows // per_chunk)):
                first = chunk * per_chunk
                begin, end = max(start, first), min(rows, first + per_chunk)
                self._array[begin:end] = memory.chunks[chunk][begin - first : end - first]
        if self._array.attrs[ROWS_WRITTEN] != memory.rows or self._array.attrs[COMPLETE] != self._complete:
            self._array.update_attributes({ROWS_WRITTEN: memory.rows, COMPLETE: self._complete})
        return self._array

    def _write(self, start: int, data: np.ndarray) -> None:
        # zarr silently drops writes past the end: grow the array first. The
        # row count goes up only once the rows are stored, so a run stopped in
        # between leaves a store that ignores them.
        end = start + data.shape[0]
        self._array.resize((end, self.n_bytes))
        self._array[start:end] = data
        self._array.update_attributes({ROWS_WRITTEN: end})

    def mark_complete(self) -> None:
        """Write every buffered row and record that the run finished."""
        self.flush()
        if not self._complete and self._memory is None:
            self._array.update_attributes({COMPLETE: True})
        self._complete = True

    def flush(self) -> None:
        """Write every buffered row (in memory, none is buffered)."""
        if self._rows is not None:
            self._rows.flush()

    @property
    def written_ranges(self) -> list[tuple[int, int]]:
        """The ``[start, stop)`` row ranges completely written: the first
        ``rows_written`` rows, and in a stopped sharded run also the regions of
        the shards it finished past the first gap."""
        ranges = [(0, len(self))] if len(self) else []
        for start, stop in self._regions:
            if ranges and start <= ranges[-1][1]:
                ranges[-1] = (ranges[-1][0], max(stop, ranges[-1][1]))
            else:
                ranges.append((start, stop))
        return ranges

    def read(self, rows: slice | np.ndarray | int | None = None) -> np.ndarray:
        """Stored rows, as a ``(k, n_bytes)`` array: all, a slice (any step), an
        integer or a one-dimensional array of integers (rows in the order given),
        or a boolean mask of one value per row.

        Only written rows can be read (see ``written_ranges``).
        """
        self.flush()
        if rows is None:
            rows = slice(0, len(self))
        # A sharded run's store may hold rows past a gap (read by range, see written_ranges).
        rows = _row_selection(rows, len(self) if self._memory is not None else self._array.shape[0])
        if self._memory is not None:
            return self._read_memory(rows)
        if isinstance(rows, slice):  # of step 1, within the array
            picked = range(rows.start, rows.stop)
            if len(picked):
                self._check_written(np.array([picked[0], picked[-1]]), contiguous=True)
                chunk_rows = self._array.chunks[0]
                self._check_chunks_present(np.arange(picked[0] // chunk_rows, picked[-1] // chunk_rows + 1))
            return self._decoded(lambda: self._array[rows], picked)
        index = rows
        if index.size and (index.min() < 0 or index.max() >= len(self)) and not self._regions:
            raise IndexOutOfRangeError(f"state rows must lie in [0, {len(self)}), got {index.min()}..{index.max()}")
        self._check_written(index)
        self._check_chunks_present(np.unique(index // self._array.chunks[0]))
        return self._decoded(lambda: self._array.get_orthogonal_selection((index, slice(None))), index)

    def _read_memory(self, rows: slice | np.ndarray) -> np.ndarray:
        """:meth:`read` of an in-memory store (a selection of :func:`_row_selection`),
        where every row appended is there."""
        if isinstance(rows, slice):
            return self._memory.span(rows.start, rows.stop)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexOutOfRangeError(f"state rows must lie in [0, {len(self)}), got {rows.min()}..{rows.max()}")
        return self._memory.take(rows)

    def _check_written(self, rows: np.ndarray, contiguous: bool = False) -> None:
        """Raise unless every row lies in a written range (all in one range if ``contiguous``)."""
        if not rows.size:
            return
        ranges = self.written_ranges
        starts = np.array([start for start, _ in ranges] or [0], dtype=np.int64)
        stops = np.array([stop for _, stop in ranges] or [0], dtype=np.int64)
        which = np.searchsorted(starts, rows, side="right") - 1
        inside = (which >= 0) & (rows < stops[np.maximum(which, 0)])
        if not inside.all() or (contiguous and which.min() != which.max()):
            bad = int(rows[~inside][0]) if not inside.all() else int(rows.max())
            raise IndexOutOfRangeError(
                f"row {bad} of state store {self.path or '(memory)'} was never completely written "
                f"(its run stopped early); the written rows are {ranges}"
            )

    def _check_chunks_present(self, chunks: np.ndarray) -> None:
        """Raise if a chunk of a store that writes every chunk is absent from its directory."""
        if self.path is None or not chunks.size or not self._array.attrs.get(EVERY_CHUNK, False):
            return
        chunk_rows = self._array.chunks[0]
        for chunk in chunks.tolist():
            if not (self.path / self._array.metadata.encode_chunk_key((chunk, 0))).is_file():
                begin = chunk * chunk_rows
                raise StoreError(
                    f"state store {self.path} is damaged: chunk {chunk} (rows {begin} to "
                    f"{min(begin + chunk_rows, self._array.shape[0]) - 1}) is missing from its directory; "
                    "rerun the analysis to rebuild it"
                )

    def _decoded(self, read: Callable[[], np.ndarray], rows: range | np.ndarray) -> np.ndarray:
        """``read()`` of ``rows``, with a chunk that does not decode named instead of a codec's bare error."""
        try:
            return read()
        except Exception as exc:  # Blosc and zarr raise RuntimeError, ValueError, ... for damaged chunks
            chunk_rows = self._array.chunks[0]
            for chunk in sorted({int(r) // chunk_rows for r in rows}):
                begin = chunk * chunk_rows
                try:
                    self._array[begin : begin + chunk_rows]
                except Exception as chunk_exc:
                    raise StoreError(
                        f"state store {self.path or '(memory)'} is damaged: chunk {chunk} (rows {begin} to "
                        f"{min(begin + chunk_rows, self._array.shape[0]) - 1}) cannot be read ({chunk_exc}); "
                        "rerun the analysis to rebuild it"
                    ) from None
            raise exc


def _row_selection(rows, n_rows: int) -> slice | np.ndarray:
    """What :meth:`StateStore.read` was asked for (of ``n_rows``), as a slice of step 1 or an int64 index array."""
    if isinstance(rows, slice):
        start, stop, step = rows.indices(n_rows)
        return slice(start, max(start, stop)) if step == 1 else np.arange(start, stop, step, dtype=np.int64)
    index = np.asarray(rows)
    if index.size == 0 and isinstance(rows, (list, tuple)):
        return np.zeros(0, np.int64)
    if index.dtype == bool:
        if index.shape != (n_rows,):
            raise IndexOutOfRangeError(
                f"a boolean mask of state rows needs one value per row ({n_rows}), got shape {index.shape}"
            )
        return np.flatnonzero(index)
    if index.dtype.kind not in "iu":
        raise OptionTypeError(
            "state rows are read by a slice, an integer, an array of integers or a boolean mask, not "
            f"{type(rows).__name__} ({index.dtype})"
        )
    if index.ndim > 1:
        raise OptionTypeError(f"an index array of state rows must be one-dimensional, got shape {index.shape}")
    return index.reshape(-1).astype(np.int64, copy=False)


def _new_array(store, chunk_rows: int, n_bytes: int, attributes: dict) -> zarr.Array:
    """An empty state array in ``store``: chunks of ``chunk_rows`` rows, compressed."""
    return zarr.create_array(
        store,
        shape=(0, n_bytes),
        chunks=(chunk_rows, n_bytes),
        dtype="uint8",
        compressors=[state_codec()],
        attributes=attributes,
        fill_value=0,
        config=_EVERY_CHUNK_CONFIG,
    )


def _positive_int(value) -> int | None:
    """``value`` if it is a positive integer (not a bool), else None."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value > 0:
        return int(value)
    return None


def _shard_regions(array: zarr.Array) -> list[tuple[int, int]]:
    """Row ranges of the shards a sharded run wrote (none for other stores)."""
    bounds = array.attrs.get("shard_rows")
    if not isinstance(bounds, list):
        return []
    written = array.attrs.get("shards_written", [])
    return [(bounds[k], bounds[k + 1]) for k in sorted(written) if 0 <= k < len(bounds) - 1]


def _rows_written(array: zarr.Array, path: Path) -> int:
    """The rows of ``array`` completely written, from its attributes.

    A store without the count (one written before it existed) is taken as
    written to its end.
    """
    if ROWS_WRITTEN not in array.attrs:
        return array.shape[0]
    rows = array.attrs[ROWS_WRITTEN]
    if not isinstance(rows, int) or isinstance(rows, bool) or not 0 <= rows <= array.shape[0]:
        raise StoreError(
            f"state store {path} is inconsistent: it says {rows!r} rows were written but holds "
            f"{array.shape[0]}; it was altered or damaged"
        )
    return rows
