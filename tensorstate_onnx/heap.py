"""How much memory this process keeps when it frees some: a speed setting for
counting on machines where memory handed back to the OS is slow to get back.

Counting mostly distinct states allocates and frees arrays of hundreds of
thousands of states every few batches (a sorted buffer, the counts of a new
run, the merge of two runs). glibc's malloc returns large freed blocks to the
OS at once, and on virtual machines each page touched again costs several
microseconds to fault in (9-17 us on the development VM). Keeping freed
memory for the next allocation made counting MobileNetV2Small's 22 probes 16%
faster there (176 -> 147 us a sample), and counting a model whose early
layers hold 2.2 million distinct states 37% faster.

The setting is process-wide (it changes every library's allocations, and the
process holds on to up to ``max_bytes`` it no longer uses), so the library
never applies it on its own: the command line does, for its own process, and
the Dask workers a run starts get the same through their environment
(:data:`.distributed.connect.WORKER_ENVIRON`).
"""

from __future__ import annotations

import ctypes
import functools
from numbers import Integral

from .errors import OptionError, OptionTypeError

__all__ = ["DEFAULT_KEPT_BYTES", "GLIBC_THRESHOLDS", "keep_freed_memory", "kept_memory_environ"]

#: What :func:`keep_freed_memory` keeps unless told otherwise: 1 GiB.
DEFAULT_KEPT_BYTES = 1 << 30

#: The environment variables that set the same thresholds when a process starts.
GLIBC_THRESHOLDS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")

# glibc's mallopt parameters (malloc.h) and the range of its int argument.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_SMALLEST = 128 * 1024  # glibc's own starting thresholds: keeping less changes nothing
_LARGEST = 2**31 - 1
_MMAP_CAP = 32 * 1024 * 1024  # the largest mmap threshold some glibc versions accept on 64-bit


#: The environment variable that has every thread of a process allocate from
#: glibc's main arena. A thread's own arena grows by heaps of 64 MiB, and glibc
#: hands a heap that becomes free back to the OS whatever the thresholds say:
#: a thread counting hundreds of MB faulted its memory in again every shard.
GLIBC_ONE_ARENA = "MALLOC_ARENA_MAX"


def kept_memory_environ(max_bytes: int = DEFAULT_KEPT_BYTES) -> dict[str, str]:
    """The environment a process must start with to keep up to ``max_bytes``
    of freed memory in every thread, not only in its main thread (what
    :func:`keep_freed_memory` sets in a running process, plus one arena for
    all threads: the Dask workers count in threads of their own). Checked
    as :func:`keep_freed_memory` checks it."""
    _check_size(max_bytes)
    return {**dict.fromkeys(GLIBC_THRESHOLDS, str(int(max_bytes))), GLIBC_ONE_ARENA: "1"}


def _check_size(max_bytes) -> None:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, Integral):
        raise OptionTypeError(f"max_bytes must be an int (bytes), got {type(max_bytes).__name__}")
    if not _SMALLEST <= max_bytes <= _LARGEST:
        raise OptionError(
            f"max_bytes must be between {_SMALLEST:,} (glibc's default) and {_LARGEST:,} bytes, got {max_bytes:,}"
        )


@functools.cache
def _mallopt():
    """glibc's ``mallopt``, or None where the C library has none. Looked up
    among the symbols the process already has (its C library's among them),
    with no search for the library's file."""
    try:
        function = ctypes.CDLL(None).mallopt
    except (OSError, TypeError, AttributeError):  # no such symbol (macOS) or no process handle (Windows)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def keep_freed_memory(max_bytes: int = DEFAULT_KEPT_BYTES) -> bool:
    """Have this process keep up to ``max_bytes`` of memory it frees for its
    next allocations, and serve allocations up to that size from it (up to
    32 MiB where glibc caps the threshold), instead of handing them back to
    the OS (glibc's ``M_TRIM_THRESHOLD`` and
    ``M_MMAP_THRESHOLD``, as the ``MALLOC_TRIM_THRESHOLD_`` and
    ``MALLOC_MMAP_THRESHOLD_`` environment variables set them at start-up).

    Returns True when applied, False where the C library does not take it
    (musl accepts and ignores it, macOS and Windows have no ``mallopt``;
    nothing changes there). Process-wide: see the
    module's description for what it costs and when it pays.
    """
    _check_size(max_bytes)
    mallopt = _mallopt()
    if mallopt is None:
        return False
    kept = bool(mallopt(_M_TRIM_THRESHOLD, int(max_bytes)))
    served = any(mallopt(_M_MMAP_THRESHOLD, size) for size in (int(max_bytes), min(int(max_bytes), _MMAP_CAP)))
    return kept and served
