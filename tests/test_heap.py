"""keep_freed_memory: freed memory stays with the process (glibc), bad sizes are refused."""

import json
import os
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


# In a thread of its own, allocates and frees four 40 MiB arrays three times and
# reports the page faults each round took (memory touched for the first time).
# At 40 MiB each array takes a 64 MiB heap of a thread arena of its own.
_THREAD_PROBE = """
import json, resource, threading
import numpy as np

faults = []

def rounds():
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        arrays = [np.ones(5 << 20) for _ in range(4)]
        del arrays
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

thread = threading.Thread(target=rounds)
thread.start()
thread.join()
print(json.dumps(faults))
"""


GLIBC_SETTINGS = (*heap.GLIBC_THRESHOLDS, heap.GLIBC_ONE_ARENA)
PAGES_A_ROUND = 4 * 40 * 2**20 // 4096


def _thread_faults(environ: dict) -> list[int]:
    names = (*GLIBC_SETTINGS, "NUMPY_MADVISE_HUGEPAGE")
    env = {name: value for name, value in os.environ.items() if name not in names}
    env.update(environ, NUMPY_MADVISE_HUGEPAGE="0")  # numpy's arrays in small pages, as most memory is
    result = subprocess.run([sys.executable, "-c", _THREAD_PROBE], capture_output=True, text=True, check=True, env=env)
    return json.loads(result.stdout)


@pytest.mark.skipif(not GLIBC, reason="the setting exists in glibc's malloc only")
def test_a_process_started_with_the_kept_memory_environ_reuses_what_its_threads_free():
    first, *again = _thread_faults(heap.kept_memory_environ())
    assert first >= PAGES_A_ROUND / 512  # new memory, in huge pages where the system always uses them
    assert max(again) < first / 10  # served from what the first round freed
    # Why one arena: with the thresholds alone, a thread's arena hands its freed
    # 64 MiB heaps back and faults them in again.
    thresholds_only = {name: str(heap.DEFAULT_KEPT_BYTES) for name in heap.GLIBC_THRESHOLDS}
    first, *again = _thread_faults(thresholds_only)
    assert min(again) > first / 10  # a quarter on the development machine


def test_the_kept_memory_environ_names_the_size_and_one_arena():
    assert heap.kept_memory_environ(2**20) == {
        "MALLOC_TRIM_THRESHOLD_": str(2**20), "MALLOC_MMAP_THRESHOLD_": str(2**20), "MALLOC_ARENA_MAX": "1",
    }  # fmt: skip
    assert heap.kept_memory_environ()["MALLOC_TRIM_THRESHOLD_"] == str(2**30)


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


@pytest.mark.parametrize("setting", [keep_freed_memory, heap.kept_memory_environ])
@pytest.mark.parametrize("size", [True, 1.5e9, "1G", None])
def test_a_size_that_is_not_an_int_is_refused(setting, size):
    with pytest.raises(OptionTypeError, match="max_bytes must be an int"):
        setting(size)


@pytest.mark.parametrize("setting", [keep_freed_memory, heap.kept_memory_environ])
@pytest.mark.parametrize("size", [-1, 0, 128 * 1024 - 1, 2**31])
def test_a_size_out_of_range_is_refused(setting, size):
    with pytest.raises(OptionError, match="max_bytes must be between"):
        setting(size)
