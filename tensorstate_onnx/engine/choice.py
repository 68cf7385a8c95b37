"""``pick``: a choice between two values that stays free of branches.

Merging two sorted runs of random states takes from one run or the other at
random; a branch there is mispredicted half the time. numba writes
``x if c else y`` as an LLVM ``select``, but LLVM turns a select into a
branch when one of its values is a load it can then skip, which is exactly
the merge's case. A select marked *unpredictable* is left as it is (a
conditional move), so both values are read and neither is skipped.
"""

from __future__ import annotations

from numba.core import types
from numba.extending import intrinsic

__all__ = ["pick"]


@intrinsic
def pick(typingctx, cond, a, b):
    """``a if cond else b`` (integers of one type) as a conditional move, never a branch."""
    if not (isinstance(cond, types.Boolean) and isinstance(a, types.Integer) and a == b):
        return None

    def codegen(context, builder, signature, args):
        chosen = builder.select(*args)
        chosen.set_metadata("unpredictable", builder.module.add_metadata([]))
        return chosen

    return a(cond, a, b), codegen
