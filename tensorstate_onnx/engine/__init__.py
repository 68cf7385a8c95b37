"""The state engine: quantize and bit-pack tensors, unpack, and count states.

A neuron fires iff its value is ``> 0``; a state is the firing pattern of the
neurons on the channel axis at one position, bit-packed LSB first (see
:mod:`.packing`). :class:`StateCounter` counts packed states as they stream in,
with memory that follows the number of distinct states, and merges and pickles
compactly. ``result()`` is unsorted by default (cheap); ``result(sort=True)``
gives ``np.unique``'s lexicographic order.

Modules, one job each:

* ``packing``: quantize and bit-pack tensors, unpack, check packed rows;
* ``counter``: StateCounter, a front over the structure that suits the state
  size: ``direct`` (at most 16 neurons: a slot per state), ``keys`` (up to 64:
  sorted runs of states as uint64 keys) or ``words`` (more: sorted runs of
  hashes referring to an arena of state words), the last two sharing
  ``runset`` (runs, buffer, merging, absorbing);
* ``policy``: the decisions of those structures (when to flush, absorb,
  merge, resize), as pure functions; ``tuning``: CounterTuning, the sizes
  they decide with;
* kernels: ``radix`` (sorting keys in place, by the faster sort of the
  machine), ``sort`` (lexicographic order of word rows), ``hashing`` (hashes and
  dedup of long states), ``runs`` (search, merge and absorb sorted runs),
  ``arrays`` (small array helpers), ``histogram`` (how many states were
  seen once, twice, ...); ``jit``: the decorator they are compiled
  with, and the per-user folder their machine code is cached in.
"""

from .counter import StateCounter
from .packing import n_bytes_for, pack, unpack
from .tuning import CounterTuning

__all__ = ["pack", "unpack", "StateCounter", "CounterTuning", "n_bytes_for"]
