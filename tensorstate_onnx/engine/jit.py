"""The decorator of the engine's numba kernels, and where their machine code is cached.

numba caches compiled functions in ``__pycache__`` beside their source unless
told otherwise. An installed package folder may be read-only or shared by
several users, and cache files left in a folder that is later removed turn it
into a namespace package that shadows an editable install. So the kernels
are cached in a folder of the user's own, the first of these that can be
written:

1. ``NUMBA_CACHE_DIR``, when the user set it (numba's own setting);
2. ``$XDG_CACHE_HOME/tensorstate-onnx/numba``, else
   ``~/.cache/tensorstate-onnx/numba``;
3. ``tensorstate-onnx-<user id>/numba`` in the temporary folder, made for the
   user alone (one made by anybody else, or open to others, is not used:
   cached code is loaded and run);

and, when none can be written, they are compiled in each process, uncached:
importing never fails for want of a cache.

numba picks a function's cache folder when the function is decorated: its
cache locator reads ``numba.config.CACHE_DIR`` then. :func:`kernel` sets that
to the chosen folder for the moment it decorates, so that numba functions of
other libraries keep the user's setting.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numba

__all__ = ["cache_dir", "find_cache_dir", "kernel"]

_NAME = "tensorstate-onnx"


def _candidates(environ: Mapping[str, str]) -> list[tuple[Path, bool]]:
    """The cache folders to try, in order, each with whether it must be the
    user's alone (a folder in a temporary folder that others may write)."""
    found = []
    if environ.get("NUMBA_CACHE_DIR"):
        found.append((Path(environ["NUMBA_CACHE_DIR"]), False))
    xdg = environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec ignores a relative path
        found.append((Path(xdg) / _NAME / "numba", False))
    else:
        with contextlib.suppress(RuntimeError, KeyError):  # no home to be found
            found.append((Path(environ.get("HOME") or Path.home()) / ".cache" / _NAME / "numba", False))
    user = os.getuid() if hasattr(os, "getuid") else environ.get("USERNAME", "user")
    found.append((Path(tempfile.gettempdir()) / f"{_NAME}-{user}" / "numba", True))
    return found


def _writable(folder: Path) -> bool:
    """Whether ``folder`` exists or can be made, and a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


def _own_private(folder: Path) -> bool:
    """Whether ``folder`` is a real folder (not a link) that only the user can write."""
    try:
        info = os.lstat(folder)
    except OSError:
        return False
    if not stat.S_ISDIR(info.st_mode):
        return False
    if hasattr(os, "getuid"):
        return info.st_uid == os.getuid() and not info.st_mode & 0o022
    return True


def _usable(folder: Path, private: bool) -> bool:
    if not private:
        return _writable(folder)
    top = folder.parent
    try:
        top.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return False
    return _own_private(top) and _writable(folder)


def find_cache_dir(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The first usable cache folder of the list above, or None (no caching)."""
    for folder, private in _candidates(environ):
        if _usable(folder, private):
            return folder
    return None


@functools.cache
def cache_dir() -> Path | None:
    """The cache folder of this process (looked for once)."""
    return find_cache_dir()


@contextlib.contextmanager
def _numba_cache_dir(folder: Path) -> Iterator[None]:
    saved = numba.config.CACHE_DIR
    numba.config.CACHE_DIR = str(folder)
    try:
        yield
    finally:
        numba.config.CACHE_DIR = saved


def kernel(function: Callable | None = None, **options) -> Callable:
    """``numba.njit(nogil=True, **options)``, cached in :func:`cache_dir`
    when there is one. Use as ``@kernel`` or ``@kernel(inline="always")``."""

    def decorate(function: Callable) -> Callable:
        folder = cache_dir()
        if folder is None:
            return numba.njit(nogil=True, **options)(function)
        with _numba_cache_dir(folder):
            return numba.njit(cache=True, nogil=True, **options)(function)

    return decorate if function is None else decorate(function)
