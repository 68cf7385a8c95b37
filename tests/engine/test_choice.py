"""pick: the branch-free choice the merge kernels use."""

import numba
import numpy as np
import pytest

from tensorstate_onnx.engine.choice import pick


@numba.njit
def _choose(conds, a, b):
    out = np.empty(conds.size, a.dtype)
    for i in range(conds.size):
        out[i] = pick(conds[i], a[i], b[i])
    return out


@pytest.mark.parametrize("dtype", [np.uint64, np.int64, np.int32, np.uint8])
def test_pick_takes_the_first_value_where_the_condition_holds(dtype):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    a = rng.integers(info.min, info.max, 1000, dtype=dtype, endpoint=True)
    b = rng.integers(info.min, info.max, 1000, dtype=dtype, endpoint=True)
    conds = rng.random(1000) < 0.5
    np.testing.assert_array_equal(_choose(conds, a, b), np.where(conds, a, b))


def test_pick_refuses_values_of_different_types():
    with pytest.raises(numba.core.errors.TypingError):
        _choose(np.ones(1, bool), np.ones(1, np.int64), np.ones(1, np.uint64))
