"""Exception types for mistakes a user can make.

Every one derives from :class:`TensorStateError`, so ``except TensorStateError``
catches exactly the user-facing errors, and the CLI turns them into a one-line
message with exit code 2. Each also derives from the builtin that fits
(``ValueError``, ``FileExistsError``, ``ImportError``, ...), so code written
against plain exception types keeps working. Anything else escaping the library
is a bug.
"""

from __future__ import annotations

__all__ = [
    "ChannelAxisError",
    "GuessedAxisWarning",
    "IndexOutOfRangeError",
    "MissingExtraError",
    "MissingFileError",
    "ModelFileError",
    "ModelInputError",
    "NoStatesError",
    "OptionError",
    "OptionTypeError",
    "PackedStateError",
    "ProbeDtypeError",
    "ProbeMatchError",
    "ProviderError",
    "SchedulerConnectionError",
    "ShardFailedError",
    "StorageExistsError",
    "StoreError",
    "TensorStateError",
    "WorkerBuildError",
    "first_line",
]


class TensorStateError(Exception):
    """Base of every error the user can cause and fix; its message says how."""


class ModelFileError(TensorStateError, ValueError):
    """An ONNX model file is missing, unreadable, corrupt or invalid."""


class ProbeMatchError(TensorStateError, ValueError):
    """``attach_to`` matched no layer, module or node of the model."""


class ModelInputError(TensorStateError, ValueError):
    """Data given to a model has the wrong name, shape or dtype, or is empty."""


class OptionError(TensorStateError, ValueError):
    """An option or argument has a value outside what it accepts."""


class OptionTypeError(TensorStateError, TypeError):
    """An option or argument is of a type the function does not take."""


class IndexOutOfRangeError(TensorStateError, IndexError):
    """An index names an input instance or stored row that was never recorded."""


class MissingFileError(TensorStateError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class StoreError(TensorStateError, ValueError):
    """A folder is not a state store, or the store is corrupt or inconsistent."""


class StorageExistsError(TensorStateError, FileExistsError):
    """A state store already exists where a new one was asked for."""


class ProviderError(TensorStateError, ValueError):
    """An onnxruntime execution provider was unknown or unavailable."""


class NoStatesError(TensorStateError, ValueError):
    """A statistic was asked of a probe that has not recorded any state."""


class MissingExtraError(TensorStateError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class ShardFailedError(TensorStateError, RuntimeError):
    """A shard could not be analyzed: its task kept killing the worker running it."""


class SchedulerConnectionError(TensorStateError, ConnectionError):
    """The Dask scheduler could not be reached, or it has no workers."""


class WorkerBuildError(TensorStateError, RuntimeError):
    """A Dask worker of a sharded run runs another build of tensorstate-onnx than the client."""


class PackedStateError(TensorStateError, ValueError):
    """Rows given as packed states are not what ``pack()`` makes for that many
    neurons: the wrong shape, or unused high bits of the last byte set."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, to quote inside one of ours."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class ChannelAxisError(TensorStateError, ValueError):
    """A ``channel_axes`` override names no probe, or an axis out of range for its tensor."""


class ProbeDtypeError(TensorStateError, ValueError):
    """A probe would watch an integer or bool tensor; probes watch float tensors."""


class GuessedAxisWarning(UserWarning):
    """No rule gave a probe's neuron axis, so the last axis was taken (a guess);
    the message names the ``channel_axes`` override that chooses another."""
