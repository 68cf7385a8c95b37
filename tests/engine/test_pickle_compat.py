"""Counters pickled by an earlier engine load to the same counts, and today's
pickles have the same form (so a counter pickled by one version can be merged
by another).

The pickles in data/ were written by ``data/make_pickles.py`` with the engine
as it was before it became a package; the rows are regenerated here from the
same seeds and counted with numpy.
"""

import importlib.util
import io
import pickle
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parent / "data"
_spec = importlib.util.spec_from_file_location("make_pickles", DATA / "make_pickles.py")
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)


def all_rows(n_neurons):
    return np.concatenate([cases.rows_for(n_neurons, part) for part in range(3)])


def as_dict(ids, counts):
    return {row.tobytes(): int(n) for row, n in zip(ids, counts)}


@pytest.mark.parametrize("n_neurons", cases.NEURONS)
def test_an_old_pickle_loads_to_the_counts_of_its_rows(n_neurons):
    written = cases.path_for(n_neurons).read_bytes()
    counter = pickle.loads(written)
    rows = all_rows(n_neurons)
    expected_ids, expected_counts = np.unique(rows, axis=0, return_counts=True)
    assert counter.n_neurons == n_neurons and counter.total == len(rows)
    ids, counts = counter.result(sort=True)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(counts, expected_counts)
    assert as_dict(*counter.result()) == as_dict(expected_ids, expected_counts)
    np.testing.assert_array_equal(counter.counts(), counter.result()[1])
    # It keeps counting, and merges with another loaded copy.
    counter.add(cases.rows_for(n_neurons, 0))
    counter.merge(pickle.loads(written))
    again = np.concatenate([rows, cases.rows_for(n_neurons, 0), rows])
    assert as_dict(*counter.result()) == as_dict(*np.unique(again, axis=0, return_counts=True))
    assert counter.total == len(again)


class _Recorded:
    """Stands in for the pickled class: keeps the class path and the state."""

    def __setstate__(self, state):
        self.state = state


def raw_state(data: bytes) -> tuple[tuple[str, str], dict]:
    found = []

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if name == "StateCounter":
                found.append((module, name))
                return _Recorded
            return super().find_class(module, name)

    state = Unpickler(io.BytesIO(data)).load().state
    (where,) = found
    return where, state


def assert_same(a, b, key):
    assert type(a) is type(b), key
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, key
        np.testing.assert_array_equal(a, b, err_msg=key)
    elif isinstance(a, tuple):
        assert len(a) == len(b), key
        for x, y in zip(a, b):
            assert_same(x, y, key)
    else:
        assert a == b, key


@pytest.mark.parametrize("n_neurons", cases.NEURONS)
def test_todays_pickle_of_the_same_counter_has_the_same_form(n_neurons):
    old_class, old = raw_state(cases.path_for(n_neurons).read_bytes())
    new_class, new = raw_state(pickle.dumps(cases.counter_for(n_neurons), protocol=4))
    assert new_class == old_class == ("tensorstate_onnx.engine", "StateCounter")
    assert list(new) == list(old)
    for key in old:
        assert_same(new[key], old[key], key)
