"""PyTorch front end: ``StateCaptureHook`` and hook attachment/removal.

A :class:`StateCaptureHook` is registered as a forward hook (``method="after"``:
it records the module's output) or a forward pre-hook (``"before"``: the first
tensor the module receives). Neurons are on axis 1 of tensors of rank >= 3
(``[N, C, ...]``) and on the last axis of rank-2 tensors (``[N, C]``).

On CPU the tensor is handed to the engine as a numpy view (no copy). On any
other device (CUDA, ...) it is quantized and bit-packed there with torch ops,
so only ``ceil(C/8)`` bytes per state cross to the host.

This module imports torch; ``import tensorstate_onnx`` never imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .capture import AbstractStateCapture
from .errors import OptionTypeError, ProbeMatchError
from .patterns import as_patterns, matches_any, preview, probe_methods
from .store import unique_store_dirname

__all__ = ["StateCaptureHook", "attach_hooks", "remove_state_layers", "pack_tensor"]

_HANDLES_ATTR = "_tensorstate_hook_handles"
# Bit weights 1, 2, ..., 128 per device (built once per device).
_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64, torch.bool)


def _channel_axis(rank: int) -> int:
    """Axis 1 for ``[N, C, ...]`` tensors (rank >= 3), the last axis otherwise."""
    return 1 if rank >= 3 else rank - 1


def _bit_weights(device: torch.device) -> torch.Tensor:
    weights = _BIT_WEIGHTS.get(device)
    if weights is None:
        weights = torch.tensor([1 << j for j in range(8)], dtype=torch.uint8, device=device)
        _BIT_WEIGHTS[device] = weights
    return weights


def pack_tensor(tensor: torch.Tensor, channel_axis: int) -> np.ndarray:
    """Quantize (``> 0``) and bit-pack ``tensor`` on its own device; return the bytes.

    Gives exactly what :func:`tensorstate_onnx.engine.pack` gives for the same
    values: ``uint8[n_states, ceil(C/8)]``, LSB first, states batch first then
    positions in row-major order. Only the packed bytes are copied to the host.
    """
    with torch.no_grad():
        fired = tensor > 0  # NaN, -0.0 and negatives do not fire; +inf does
        fired = fired.movedim(channel_axis, -1)
        n_neurons = fired.shape[-1]
        flat = fired.reshape(-1, n_neurons).to(torch.uint8)
        pad = (-n_neurons) % 8
        if pad:
            flat = torch.nn.functional.pad(flat, (0, pad))
        bits = flat.reshape(flat.shape[0], -1, 8)
        packed = (bits * _bit_weights(bits.device)).sum(dim=-1, dtype=torch.uint8)
        return packed.cpu().numpy()


def _is_real_tensor(value) -> bool:
    """A concrete tensor with data (not a fake/meta tensor seen while tracing or exporting)."""
    if not isinstance(value, torch.Tensor) or value.is_meta:
        return False
    if type(value) is not torch.Tensor and not isinstance(value, torch.nn.Parameter):
        return False  # FakeTensor, FunctionalTensor and other tracing subclasses
    return not value.is_sparse and not value.is_quantized and not value.is_complex()


def _tracing() -> bool:
    """Whether torch is tracing (export, compile, TorchScript) rather than running."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None:
        for check in ("is_exporting", "is_compiling"):
            func = getattr(compiler, check, None)
            if func is not None and func():
                return True
    return torch.jit.is_tracing() or torch.jit.is_scripting()


def _exporting() -> bool:
    """Whether the module is being traced for export (torch.export, TorchScript)."""
    is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)
    return bool(is_exporting is not None and is_exporting()) or torch.jit.is_tracing()


def _disable_compile(func):
    """Keep ``func`` out of ``torch.compile`` graphs: dynamo breaks the graph and runs
    it eagerly on real tensors, so compiled modules record too."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(func) if disable is not None else func


@_disable_compile
def _record_eagerly(hook: "StateCaptureHook", tensor: torch.Tensor) -> None:
    hook.record_tensor(tensor)


def _first_tensor(values) -> torch.Tensor | None:
    """The first tensor in a (nested) structure of tuples, lists and dicts, in order."""
    if isinstance(values, torch.Tensor):
        return values
    if isinstance(values, dict):
        values = values.values()
    if isinstance(values, (tuple, list, type({}.values()))):
        for item in values:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


class StateCaptureHook(AbstractStateCapture):
    """State capture for PyTorch, used as a forward hook or a forward pre-hook.

    Args:
        name: the capture's name (``attach_hooks`` uses ``"<module>:<method>"``).
        disk_path: directory of a zarr store for the raw states, or ``None``.
        method: ``"after"`` (register with ``register_forward_hook``: records the
            module's output) or ``"before"`` (``register_forward_pre_hook``:
            records the first tensor input).
        keep_states, overwrite, metadata: see
            :class:`~tensorstate_onnx.capture.AbstractStateCapture`.

    The hook records the first tensor of the output (or input) structure and
    returns ``None``, so the module's computation is unchanged. It works under
    ``torch.no_grad()`` and ``torch.inference_mode()``, for float16, bfloat16,
    float32 and float64 tensors on any device, and in ``torch.compile``d
    modules (the recording runs outside the compiled graph); it does nothing
    while the module is traced for export (ONNX, ``torch.export``, TorchScript).
    """

    def __init__(
        self,
        name: str,
        disk_path: str | os.PathLike | None = None,
        method: str = "after",
        keep_states: bool = True,
        overwrite: bool = False,
        metadata: dict | None = None,
        **kwargs,
    ):
        if method not in ("before", "after"):
            raise ValueError(f"a StateCaptureHook's method is 'before' or 'after', got {method!r}")
        meta = {"method": method, "framework": "torch", **(metadata or {})}
        super().__init__(name, disk_path, keep_states, overwrite, meta, **kwargs)
        self.method = method

    def __call__(self, module, args, *rest):
        """Forward hook ``(module, args, output)`` / ``(module, args, kwargs, output)``
        or pre-hook ``(module, args)`` / ``(module, args, kwargs)``."""
        if not self.capture_on or _exporting():
            return None
        if self.method == "after":
            value = rest[-1] if rest else None
        else:
            value = _first_tensor(args)
            if value is None and rest and isinstance(rest[0], dict):
                value = _first_tensor(rest[0])
        tensor = _first_tensor(value)
        if tensor is not None:
            _record_eagerly(self, tensor)
        return None

    def record_tensor(self, tensor: torch.Tensor, channel_axis: int | None = None) -> None:
        """Record one batch held in a torch tensor (axis 1 for rank >= 3 by default)."""
        if not self.capture_on or not _is_real_tensor(tensor) or _tracing():
            return
        if tensor.dim() == 0:
            return
        axis = _channel_axis(tensor.dim()) if channel_axis is None else channel_axis % tensor.dim()
        if tensor.numel() == 0:
            return
        if tensor.device.type == "cpu":
            data = tensor.detach()
            if data.dtype not in _NUMPY_DTYPES:  # bfloat16, integers: the firing pattern only
                data = data > 0
            self.record(data.numpy(), axis)
            return
        packed = pack_tensor(tensor.detach(), axis)
        instances = tensor.shape[0] if tensor.dim() >= 2 and axis != 0 else 1
        self.record_packed(packed, tensor.shape[axis], instances)


# --------------------------------------------------------------------------- attaching


def _module_keys(qualname: str, module: torch.nn.Module) -> set[str]:
    cls = type(module)
    keys = {cls.__name__, f"{cls.__module__}.{cls.__qualname__}"}
    if qualname:
        keys.add(qualname)
    return keys


def attach_hooks(
    module: torch.nn.Module,
    attach_to,
    exclude=(),
    method: str = "after",
    storage_path: str | os.PathLike | None = None,
    *,
    keep_states: bool = True,
    overwrite: bool = False,
) -> torch.nn.Module:
    """Register a :class:`StateCaptureHook` on every matching submodule of ``module``.

    Args:
        module: the ``torch.nn.Module`` to probe (modified in place and returned).
        attach_to: module class names (``"Conv2d"``, or the full
            ``"torch.nn.modules.conv.Conv2d"``) or qualified module names
            (``"features.0"``); case-sensitive ``fnmatch`` globs allowed.
        exclude: patterns of the same kinds; a module matching one is never
            probed (exclude wins over attach_to).
        method: ``"after"`` (module output), ``"before"`` (first tensor input)
            or ``"both"``.
        storage_path: directory under which each capture keeps its raw states
            (``<storage_path>/<capture name>``, with characters other than
            letters, digits, ``_``, ``.`` and ``-`` replaced by ``_``).
        keep_states: keep raw states in memory when there is no storage path
            (needed for ``states`` and ``counts(index=...)``; counts and
            entropies never need them).
        overwrite: replace existing stores under ``storage_path``.

    Returns:
        ``module``, with ``module.efficiency_layers``: the hooks in module order
        (``before`` ahead of ``after`` for the same module), named
        ``"<qualified module name>:<method>"`` (the root module by its class name).
        Hooks attached by an earlier call are removed first.

    Raises:
        TypeError: ``module`` is not a ``torch.nn.Module``.
        ValueError: an invalid ``method``.
        ProbeMatchError: ``attach_to`` matched no module (the message lists the
            module names and classes), or everything matched is excluded.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"attach_hooks takes a torch.nn.Module, got {type(module).__name__}")
    methods = probe_methods(method)
    patterns = as_patterns(attach_to, "attach_to")
    excluded = as_patterns(exclude, "exclude")
    if not patterns:
        raise ProbeMatchError("attach_to is empty; name at least one module class or module name")
    named = list(module.named_modules())
    matched = [(name, sub) for name, sub in named if matches_any(patterns, _module_keys(name, sub))]
    if not matched:
        listing = [f"{name or '(root)'} ({type(sub).__name__})" for name, sub in named]
        classes = sorted({type(sub).__name__ for _, sub in named})
        raise ProbeMatchError(
            f"attach_to {patterns} matched no module of {type(module).__name__}. "
            f"Module classes present: {', '.join(classes)}. Modules: {preview(listing, 25)}. "
            "Patterns are case-sensitive and may use * and ? wildcards."
        )
    chosen = [(name, sub) for name, sub in matched if not matches_any(excluded, _module_keys(name, sub))]
    if not chosen:
        raise ProbeMatchError(f"everything attach_to {patterns} matched is excluded by exclude {excluded}")

    remove_state_layers(module)
    root = None if storage_path is None else Path(storage_path)
    hooks: list[StateCaptureHook] = []
    handles = []
    used_dirs: set[str] = set()
    try:
        for name, sub in chosen:
            label = name or type(sub).__name__
            for m in methods:
                capture_name = f"{label}:{m}"
                disk_path = None if root is None else root / unique_store_dirname(capture_name, used_dirs)
                metadata = {"module": name, "module_class": type(sub).__name__}
                hook = StateCaptureHook(
                    capture_name, disk_path, m, keep_states=keep_states, overwrite=overwrite,
                    metadata=metadata,
                )
                if m == "before":
                    handles.append(sub.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    handles.append(sub.register_forward_hook(hook))
                hooks.append(hook)
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    setattr(module, _HANDLES_ATTR, handles)
    module.efficiency_layers = hooks
    return module


def remove_state_layers(module: torch.nn.Module) -> torch.nn.Module:
    """Remove every hook :func:`attach_hooks` registered on ``module`` and its
    ``efficiency_layers`` attribute; return ``module``. Safe to call twice."""
    if not isinstance(module, torch.nn.Module):
        raise OptionTypeError(f"remove_state_layers takes a torch.nn.Module, not {type(module).__name__}")
    for handle in getattr(module, _HANDLES_ATTR, ()):
        handle.remove()
    for attr in (_HANDLES_ATTR, "efficiency_layers"):
        if attr in module.__dict__:
            delattr(module, attr)
    return module
