"""keep_freed_memory: freed memory stays with the process (glibc), bad sizes are refused."""

import json
import platform
import subprocess
import sys

import pytest

from tensorstate_onnx import heap, keep_freed_memory
from tensorstate_onnx.errors import OptionError, OptionTypeError

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates and frees 8 MiB numpy arrays, then reports how many bytes malloc
# holds free (mallinfo2's fordblks: freed, kept for the next allocation).
_PROBE = """
import ctypes, json, sys
import numpy as np
from tensorstate_onnx import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
for _ in range(3):
    arrays = [np.ones(1 << 20) for _ in range(4)]
    del arrays
print(json.dumps({"applied": applied, "free_held": libc.mallinfo2().fordblks}))
"""


def _held_after_freeing(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@pytest.mark.skipif(not GLIBC, reason="the setting exists in glibc's malloc only")
def test_freed_arrays_stay_with_the_process():
    kept = _held_after_freeing("keep")
    assert kept["applied"] is True
    assert kept["free_held"] >= 4 * 8 * 2**20  # all four arrays, ready for the next allocation
    default = _held_after_freeing("default")
    assert default["free_held"] < 8 * 2**20  # glibc hands each back at once


def test_a_glibc_that_caps_the_mmap_threshold_gets_its_cap(monkeypatch):
    calls = []

    def mallopt(param, value):  # refuses an mmap threshold over 32 MiB, as some glibc versions do
        calls.append((param, value))
        return int(not (param == -3 and value > 32 * 2**20))

    monkeypatch.setattr(heap, "_mallopt", lambda: mallopt)
    assert keep_freed_memory(2**30) is True
    assert calls == [(-1, 2**30), (-3, 2**30), (-3, 32 * 2**20)]
    calls.clear()
    assert keep_freed_memory(2**20) is True
    assert calls == [(-1, 2**20), (-3, 2**20)]  # accepted at once: no second try


def test_a_c_library_that_refuses_both_reports_it(monkeypatch):
    monkeypatch.setattr(heap, "_mallopt", lambda: lambda param, value: 0)  # musl's stub
    assert keep_freed_memory() is False


def test_without_glibc_nothing_changes(monkeypatch):
    monkeypatch.setattr(heap, "_mallopt", lambda: None)
    assert keep_freed_memory() is False


@pytest.mark.parametrize("size", [True, 1.5e9, "1G", None])
def test_a_size_that_is_not_an_int_is_refused(size):
    with pytest.raises(OptionTypeError, match="max_bytes must be an int"):
        keep_freed_memory(size)


@pytest.mark.parametrize("size", [-1, 0, 128 * 1024 - 1, 2**31])
def test_a_size_out_of_range_is_refused(size):
    with pytest.raises(OptionError, match="max_bytes must be between"):
        keep_freed_memory(size)
