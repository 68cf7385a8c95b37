"""The state engine: quantize and bit-pack tensors, unpack, and count states.

A neuron fires iff its value is ``> 0``; a state is the firing pattern of the
neurons on the channel axis at one position, bit-packed LSB first (see
:mod:`.packing`). :class:`StateCounter` counts packed states as they stream in,
with memory that follows the number of distinct states, and merges and pickles
compactly. ``result()`` is unsorted by default (cheap); ``result(sort=True)``
gives ``np.unique``'s lexicographic order.

Modules: ``packing`` (quantize, pack, unpack, check packed rows), ``counter``
(StateCounter), ``tuning`` (CounterTuning: the sizes that steer it), and the kernels it counts with: ``sort`` (radix and
lexicographic sorts), ``hashing`` (hashes and dedup of long states), ``runs``
(sorted runs of distinct states: search, merge, absorb).
"""

from .counter import StateCounter
from .packing import n_bytes_for, pack, unpack
from .tuning import CounterTuning

__all__ = ["pack", "unpack", "StateCounter", "CounterTuning", "n_bytes_for"]
