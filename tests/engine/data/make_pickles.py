"""Write the pickled StateCounters that tests/engine/test_pickle_compat.py loads.

Run from the repository root: ``python tests/engine/data/make_pickles.py``.
The pickles were written by the engine as it was before it became a package
(one module, ``tensorstate_onnx/engine.py``); the test checks that today's
engine loads them to the same counts, so a counter pickled by one version can
be merged by another. Do not regenerate them unless the pickle format changes
on purpose.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# n_neurons of each case: direct counts (1 and 2 bytes), one word (5 and 8
# bytes), several words (13 and 38 bytes).
NEURONS = (5, 13, 40, 64, 100, 300)


def rows_for(n_neurons: int, part: int) -> np.ndarray:
    """Packed states of ``part`` 0, 1 or 2 for ``n_neurons``: draws from one
    pool of states (so parts share states), a third of them its first state
    (counts beyond 255), unused high bits of the last byte zero."""
    width = (n_neurons + 7) // 8
    pool = np.random.default_rng(n_neurons).integers(0, 256, (400, width), dtype=np.uint8)
    if n_neurons % 8:
        pool[:, -1] &= (1 << (n_neurons % 8)) - 1
    rng = np.random.default_rng([n_neurons, part])
    picks = rng.integers(0, len(pool), 1500 + 500 * part)
    picks[rng.random(picks.size) < 1 / 3] = 0
    return pool[picks]


def counter_for(n_neurons: int):
    """Counts of parts 0 and 2 added, part 1 counted apart and merged in between."""
    from tensorstate_onnx.engine import StateCounter

    counter = StateCounter(n_neurons)
    counter.add(rows_for(n_neurons, 0))
    other = StateCounter(n_neurons)
    other.add(rows_for(n_neurons, 1))
    counter.merge(other)
    counter.add(rows_for(n_neurons, 2))
    return counter


def path_for(n_neurons: int) -> Path:
    return HERE / f"counter_{n_neurons}.pkl"


def main() -> None:
    for n_neurons in NEURONS:
        path_for(n_neurons).write_bytes(pickle.dumps(counter_for(n_neurons), protocol=4))


if __name__ == "__main__":
    main()
