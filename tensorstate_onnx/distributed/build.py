"""Which build of this library a process runs, so that a sharded run refuses a
worker that runs another.

The workers of a run must agree on more than the version number: the hash that
puts a state in its partition, the form counters take between workers and the
quantization of every probe are all in this package's source. Workers of
different builds would put one state in two partitions (its histogram would
count it twice) or read each other's counters wrongly: wrong numbers, not an
error. So a build is the version and a digest of the package's source files,
and a task whose process runs another build than the client's fails with a
:class:`~tensorstate_onnx.errors.WorkerBuildError`.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

from .. import __version__
from ..errors import WorkerBuildError

_PACKAGE = Path(__file__).resolve().parent.parent
_build: str | None = None  # this process's build, computed on first use


def build_id() -> str:
    """This process's build of tensorstate-onnx: ``version+digest`` of its
    source files (the version alone when the source cannot be read)."""
    global _build
    if _build is None:
        digest = hashlib.sha256()
        try:
            sources = sorted(_PACKAGE.rglob("*.py"))
            for path in sources:
                digest.update(path.relative_to(_PACKAGE).as_posix().encode() + b"\0")
                digest.update(path.read_bytes())
        except OSError:
            sources = []
        _build = f"{__version__}+{digest.hexdigest()[:12]}" if sources else __version__
    return _build


def check_build(expected: str, what: str, whose: str = "the client") -> None:
    """Refuse to go on in this process (``what``) if it runs another build than
    ``expected``, the build of ``whose``."""
    mine = build_id()
    if mine != expected:
        raise WorkerBuildError(
            f"{what} on host {socket.gethostname()} (pid {os.getpid()}) runs tensorstate-onnx {mine}, but "
            f"{whose} runs {expected}; every worker of a sharded run must run the same version with the same "
            "files (states would fall into different partitions and be counted twice): install the "
            "client's version on every worker, then restart the workers"
        )
