"""CounterTuning: checked when made, held by a counter, not pickled with it."""

import pickle

import pytest

from tensorstate_onnx.engine import CounterTuning, StateCounter
from tensorstate_onnx.errors import OptionError, OptionTypeError


@pytest.mark.parametrize(
    "options, error, message",
    [
        ({"chunk_rows": 0}, OptionError, "chunk_rows must be in 1..2\\*\\*40"),
        ({"chunk_rows": 1 << 41}, OptionError, "chunk_rows"),
        ({"buffer_min_bytes": 100, "buffer_max_bytes": 10}, OptionError, "buffer_max_bytes \\(10\\) is below"),
        ({"group_reps": 0}, OptionError, "group_reps must be at least 1"),
        ({"absorb_ratio": -1}, OptionError, "absorb_ratio"),
        ({"sample_rows": 0}, OptionError, "sample_rows"),
        ({"index_rows": -1}, OptionError, "index_rows must be in 0..2\\*\\*30"),
        ({"index_rows": 1 << 31}, OptionError, "index_rows"),
        ({"hash_mask": 1 << 64}, OptionError, "hash_mask must be a 64-bit mask"),
        ({"hash_mask": -1}, OptionError, "hash_mask"),
        ({"sample_rows": 64.0}, OptionTypeError, "sample_rows must be an int, got 64.0"),
        ({"chunk_rows": True}, OptionTypeError, "chunk_rows must be an int"),
    ],
)
def test_bad_tunings_are_refused(options, error, message):
    with pytest.raises(error, match=message):
        CounterTuning(**options)


def test_a_counter_holds_its_tuning_but_a_pickle_does_not():
    tiny = CounterTuning(chunk_rows=37, buffer_min_bytes=8, buffer_max_bytes=1600)
    counter = StateCounter(100, tiny)
    assert counter.tuning is tiny and StateCounter(100).tuning == CounterTuning()
    assert pickle.loads(pickle.dumps(counter)).tuning == CounterTuning()
    with pytest.raises(OptionTypeError, match="must be a CounterTuning or None, got dict"):
        StateCounter(100, {"chunk_rows": 10})
    with pytest.raises(AttributeError):
        tiny.chunk_rows = 5  # frozen: one tuning may be shared by many counters
