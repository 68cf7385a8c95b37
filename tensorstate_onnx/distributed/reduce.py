"""Partial results of shards and their reduction tree.

Shard tasks return a :class:`_Partial` (counters and sample counts of one
shard); merge tasks combine partials into new ones, never modifying their
inputs, so Dask may rerun any of them. :func:`_build_tree` lays out the merge
tasks before the run: a static tree over consecutive shards, in which every
partial is the input of exactly one merge task or is itself a root.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..engine import StateCounter
from ..errors import ModelInputError
from .plan import _shape_text


@dataclass
class _Partial:
    """Merged counts of a set of shards (what shard and merge tasks return)."""

    shards: list[int]
    probe_names: tuple
    counters: list[StateCounter | None]
    n_samples: int
    correct: int
    labelled: int
    sample_shape: Any  # per-sample input shape(s), None when no sample was seen
    shape_shard: int | None  # the shard that showed ``sample_shape`` first
    shard_seconds: list[float]
    merge_seconds: list[float]
    last_end: float  # time.time() when the last of these shards finished
    merge_units: list[int] = field(default_factory=list)  # shards covered by each merge task's output

    def __sizeof__(self) -> int:
        # What Dask's memory accounting sees (it calls sys.getsizeof on results).
        held = sum(getattr(c, "nbytes", 0) for c in self.counters if c is not None)
        return object.__sizeof__(self) + int(held)


def _check_same_shape(a: _Partial, b: _Partial) -> None:
    """Raise ``ModelInputError`` if the two partials saw samples of different shapes."""
    if a.sample_shape is not None and b.sample_shape is not None and a.sample_shape != b.sample_shape:
        raise ModelInputError(
            f"shard {b.shape_shard} has samples of shape {_shape_text(b.sample_shape)} but shard "
            f"{a.shape_shard} has {_shape_text(a.sample_shape)}; every shard must hold samples "
            "of the same shape"
        )


def _merge_partials(*parts: _Partial) -> _Partial:
    """Task: combine partial results into new counters (inputs are never modified)."""
    started = time.perf_counter()
    first = parts[0]
    shape_owner = first
    for part in parts[1:]:
        if part.probe_names != first.probe_names:
            raise RuntimeError(
                f"shards {first.shards} and {part.shards} probed different tensors; the model "
                "file differs between workers"
            )
        if shape_owner.sample_shape is None:
            shape_owner = part
        else:
            _check_same_shape(shape_owner, part)
    counters: list[StateCounter | None] = []
    for i in range(len(first.probe_names)):
        present = [part.counters[i] for part in parts if part.counters[i] is not None]
        if len(present) <= 1:
            counters.append(present[0] if present else None)
            continue
        merged = StateCounter(present[0].n_neurons)
        for counter in present:
            merged.merge(counter)
        counters.append(merged)
    return _Partial(
        shards=sorted(s for part in parts for s in part.shards),
        probe_names=first.probe_names,
        counters=counters,
        n_samples=sum(part.n_samples for part in parts),
        correct=sum(part.correct for part in parts),
        labelled=sum(part.labelled for part in parts),
        sample_shape=shape_owner.sample_shape,
        shape_shard=shape_owner.shape_shard,
        shard_seconds=[s for part in parts for s in part.shard_seconds],
        merge_seconds=[s for part in parts for s in part.merge_seconds] + [time.perf_counter() - started],
        last_end=max(part.last_end for part in parts),
        merge_units=[u for part in parts for u in part.merge_units] + [sum(len(part.shards) for part in parts)],
    )


def _build_tree(client, leaves: list, fan_in: int, roots: int, token: str) -> list:
    """Merge tasks over consecutive leaves, level by level, until at most ``roots`` remain."""
    level, depth = list(leaves), 0
    while len(level) > max(1, roots):
        depth += 1
        nxt = []
        for j in range(0, len(level), fan_in):
            group = level[j : j + fan_in]
            if len(group) == 1:
                nxt.append(group[0])
            else:
                nxt.append(
                    client.submit(
                        _merge_partials, *group, key=f"tensorstate-merge-{depth}-{j // fan_in}-{token}",
                        pure=False, priority=depth,
                    )
                )  # fmt: skip
        level = nxt
    return level
