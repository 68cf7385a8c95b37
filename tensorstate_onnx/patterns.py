"""How ``attach_to``/``exclude``/``method`` choose probes, for every front end.

The ONNX rewriter, the PyTorch hooks and the Keras layers accept the same
kind of pattern (a name or a case-sensitive ``fnmatch`` glob), the same
``method`` values, and explain a miss the same way, by listing some of the
names that do exist.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from .errors import OptionError, OptionTypeError

__all__ = ["METHODS", "as_patterns", "matches_any", "preview", "probe_methods"]

METHODS = ("before", "after", "both")
"""Where a probe watches a layer: its input, its output, or both."""


def probe_methods(method: str) -> tuple[str, ...]:
    """The sides a ``method`` probes: ``("before",)``, ``("after",)`` or both.

    Raises OptionError for any other value.
    """
    if method not in METHODS:
        raise OptionError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    return ("before", "after") if method == "both" else (method,)


def as_patterns(value: str | Iterable[str] | None, what: str) -> list[str]:
    """``attach_to``/``exclude`` as a list of strings (one string is one pattern).

    Raises TypeError naming ``what`` for an entry that is not a string.
    """
    if not isinstance(value, (str, Iterable)) and value is not None:
        raise OptionTypeError(f"{what} takes a name or a list of names, got {type(value).__name__} {value!r}")
    patterns = [value] if isinstance(value, str) else list(value or ())
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise OptionTypeError(f"{what} entries must be strings, got {pattern!r}")
    return patterns


def matches_any(patterns: Iterable[str], names: Iterable[str]) -> bool:
    """Whether any pattern matches any name (case-sensitive, ``*``/``?``/``[]`` globs)."""
    names = list(names)
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns for name in names)


def preview(names: Sequence[str], limit: int = 10) -> str:
    """Up to ``limit`` names, comma separated, with a count of the rest."""
    if not names:
        return "(none)"
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"
