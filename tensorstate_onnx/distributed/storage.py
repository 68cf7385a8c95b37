"""Raw states of a sharded run: one zarr array per probe, written region by region.

The client creates every array before the run, sized for the whole data, with
chunks that hold whole samples and divide every shard boundary; each shard task
then writes its own rows in whole chunks that no other task touches (a retried
shard rewrites the same region with the same bytes). The attributes
``complete`` and ``shards_written`` say which shards are there, and
``rows_written`` how many rows from the start are there without a gap: a
reopened store of a stopped run reads only those.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable

import numpy as np
import zarr

from ..capture import batch_axis
from ..engine import n_bytes_for
from ..errors import OptionError
from ..graph import Probe
from ..runtime import OnnxEfficiencyModel
from ..store import (
    COMPLETE, EVERY_CHUNK, ROWS_WRITTEN, STATE_CHUNK_BYTES, ChunkedRows, StateStore, state_codec, store_dirname,
    writing_every_chunk,
)  # fmt: skip
from .plan import _Shard

log = logging.getLogger(__name__)


class _RegionWriter:
    """Writes one shard's rows of one probe into its region of the shared zarr array.

    The region starts on a chunk boundary and (unless it is the last region)
    ends on one, so whole chunks are written and no other task writes them.
    """

    def __init__(self, path: str, start_row: int, n_rows: int, chunk_rows: int, where: str):
        self.array = writing_every_chunk(zarr.open_array(zarr.storage.LocalStore(path), mode="r+"))
        self.start = start_row
        self.n_rows = n_rows
        self.where = where
        self._rows = ChunkedRows(chunk_rows, self._write)

    def append(self, packed: np.ndarray) -> None:
        """Add the shard's next rows; whole chunks are written at once, the rest at ``close``."""
        if self._rows.written + self._rows.pending_rows + packed.shape[0] > self.n_rows:
            raise OptionError(
                f"{self.where} produced more than the {self.n_rows} states expected for "
                f"{self.array.store}; its samples do not have the shape the storage was sized for"
            )
        self._rows.append(packed)

    def _write(self, first: int, data: np.ndarray) -> None:
        begin = self.start + first
        self.array[begin : begin + data.shape[0]] = data

    def close(self) -> None:
        """Write the rest; raise unless the shard produced exactly its region's rows."""
        self._rows.flush()
        if self._rows.written != self.n_rows:
            raise OptionError(
                f"{self.where} produced {self._rows.written} states for {self.array.store}, "
                f"{self.n_rows} were expected"
            )


def _states_per_instance(probe: Probe, batch_size: int | None = None) -> int | None:
    """States one sample gives ``probe`` (its positions besides batch and channel, summed
    over the calls of a module that runs several times), or None if not static.
    ``batch_size`` is the model's fixed batch size, None when its batch axis is free."""
    per = [_call_states_per_instance(call, batch_size) for call in probe.each_call()]
    return None if None in per else sum(per)


def _call_states_per_instance(probe: Probe, batch_size: int | None) -> int | None:
    shape = probe.shape
    if shape is not None and len(shape) == 1:
        return 1  # [N]: one neuron per sample
    if shape is None or len(shape) < 2 or probe.channel_axis % len(shape) == 0:
        return None
    axis = probe.channel_axis % len(shape)
    unknown = [i for i, d in enumerate(shape) if i != axis and not isinstance(d, (int, np.integer))]
    if len(unknown) > 1:
        return None
    # The batch axis: the one free dimension (a free batch axis), else where capture.batch_axis finds it.
    first = unknown[0] if unknown else batch_axis(shape, axis, batch_size)
    dims = [d for i, d in enumerate(shape) if i not in (first, axis)]
    return int(np.prod(dims, dtype=np.int64))


def _largest_divisor_at_most(value: int, cap: int) -> int:
    """The largest divisor of ``value`` that is <= ``cap`` (at least 1)."""
    if value <= cap:
        return value
    best = 1
    for d in range(1, math.isqrt(value) + 1):
        if value % d == 0:
            if d <= cap:
                best = max(best, d)
            if value // d <= cap:
                best = max(best, value // d)
    return best


def _create_stores(root: Path, local: OnnxEfficiencyModel, shards: list[_Shard], n: int, overwrite: bool) -> dict:
    """Pre-size one zarr array per probe; return the job's storage map."""
    missing = [s.where for s in shards if s.start is None]
    if missing:
        raise OptionError(
            "storage needs the size of every shard before the run; give shard_sizes= with a "
            "callable data source"
        )
    plan = {}
    for capture in local.efficiency_layers:
        probe = capture.probe
        per = _states_per_instance(probe, local.fixed_batch_size)
        neurons = probe.n_neurons
        if per is None or not neurons:
            raise OptionError(
                f"storage needs a static number of states per sample and of neurons; probe "
                f"{probe.name!r} has shape {probe.shape} (channel axis {probe.channel_axis}). "
                "Give the model static spatial dimensions or run without storage_path"
            )
        plan[probe.name] = (capture, per, int(neurons))
    boundaries = 0
    for shard in shards[1:]:
        boundaries = math.gcd(boundaries, shard.start)
    storage = {}
    codec = state_codec()
    for name, (capture, per, neurons) in plan.items():
        n_bytes = n_bytes_for(neurons)
        cap = max(1, STATE_CHUNK_BYTES // (per * n_bytes))
        samples_per_chunk = _largest_divisor_at_most(boundaries, cap) if boundaries else min(n, cap)
        chunk_rows = samples_per_chunk * per
        directory = root / store_dirname(name)
        attributes = {
            "n_neurons": neurons, "name": name, **capture.metadata, "states_per_instance": per,
            "n_samples": n, "n_shards": len(shards), COMPLETE: False, "shards_written": [],
            "shard_rows": [s.start * per for s in shards] + [n * per], ROWS_WRITTEN: 0, EVERY_CHUNK: True,
        }  # fmt: skip
        zarr.create_array(
            zarr.storage.LocalStore(directory), shape=(n * per, n_bytes), chunks=(chunk_rows, n_bytes),
            dtype="uint8", compressors=[codec], attributes=attributes, fill_value=0,
            overwrite=overwrite,
        )  # fmt: skip
        storage[name] = (str(directory), chunk_rows, per)
    return storage


def _mark_stores(storage: dict | None, written: Iterable[int], complete: bool) -> None:
    """Record in every array's attributes which shards are there and whether the run completed."""
    if not storage:
        return
    written = sorted(written)
    for directory, _, _ in storage.values():
        try:
            array = zarr.open_array(zarr.storage.LocalStore(directory), mode="r+")
            bounds = array.attrs["shard_rows"]
            prefix = 0
            while prefix < len(written) and written[prefix] == prefix:
                prefix += 1
            attributes = {COMPLETE: complete, "shards_written": written, ROWS_WRITTEN: bounds[prefix]}
            array.update_attributes(attributes)
        except Exception as exc:  # never hide the run's own error behind this one
            log.warning("could not update the attributes of %s: %s", directory, exc)


def _attach_stores(local: OnnxEfficiencyModel, storage: dict, n: int) -> None:
    """Let the local captures read the stored states (``states``, ``counts(index=...)``)."""
    for capture in local.efficiency_layers:
        directory, _, per = storage[capture.name]
        store = StateStore.open(directory)
        capture.attach_store(store, instances=n, states_per_instance=per)
