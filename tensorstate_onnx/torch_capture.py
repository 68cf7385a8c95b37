"""PyTorch front end: ``StateCaptureHook`` and hook attachment/removal.

A :class:`StateCaptureHook` is registered as a forward hook (``method="after"``:
it records the module's output) or a forward pre-hook (``"before"``: the first
tensor the module receives).

Neurons are the feature axis of the module that produced the tensor (DESIGN §1):
axis 1 for the channels-first conv family (Conv*, ConvTranspose*, BatchNorm*d,
InstanceNorm*d, GroupNorm, pooling, LRN, pixel shuffles), the last axis for
dense and sequence modules (Linear, LayerNorm, Embedding, MultiheadAttention,
RNN/LSTM/GRU, Transformer layers); elementwise modules (activations, Dropout,
Identity, padding, Upsample) inherit the axis of the tensor they read, and
Flatten/Unflatten carry it when they leave it untouched. :func:`attach_hooks`
follows the tensors of a forward pass with light hooks on every submodule (an
``AxisTracker``): which module produced each tensor, and for a tensor made
by a plain torch function (``x + y``, ``x.squeeze(2)``) the tensor of the same
shape (up to unit dimensions) that the enclosing module saw last. A tensor read
by a conv-family module has its neurons on axis 1 (what the module reads as
channels), one read by a dense module on the last axis. Rank-1 tensors ``[N]``
are one neuron per sample and rank-2 tensors ``[N, C]`` have their neurons last.
Where nothing decides, the last axis is taken with a :class:`GuessedAxisWarning`
naming the ``channel_axes`` override. When every probed module fixes its axis
itself (conv-family modules, a dense module's output, an override), no tensor
needs following: the tracker then hooks only the root and the modules leading
to a probe, to open and close each pass (and read the mask).

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

from .axes import check_override_keys, checked_override, dtype_error, warn_guessed
from .capture import AbstractStateCapture, batch_instances, positions_kept, sweep_stale_stores
from .engine import pack
from .errors import OptionError, OptionTypeError, ProbeMatchError
from .patterns import as_patterns, matches_any, preview, probe_methods
from .store import check_storage_root, unique_store_dirname
from .torch_training import EfficiencyTracker
from .torch_axes import (
    CHANNELS, FEATURES, AxisTracker, disable_compile, exporting, first_tensor, is_real_tensor, module_kind, plain_axis,
    tracing,
)  # fmt: skip

__all__ = ["EfficiencyTracker", "StateCaptureHook", "attach_hooks", "remove_state_layers", "pack_tensor"]

_HANDLES_ATTR = "_tensorstate_hook_handles"
# Bit weights 1, 2, ..., 128 per device (built once per device).
_BIT_WEIGHTS: dict[torch.device, torch.Tensor] = {}
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NUMPY_DTYPES = (torch.float16, torch.float32, torch.float64)

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


@disable_compile
def _record_eagerly(hook: "StateCaptureHook", module: torch.nn.Module, tensor: torch.Tensor) -> None:
    hook.record_from(module, tensor)


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
        channel_axis: the neuron axis to use instead of the rule's (an
            override, checked against each tensor's rank).

    The neuron axis follows the rule of the module docstring; a hook that
    :func:`attach_hooks` registers also follows the tensors of the forward
    pass, one registered by hand decides from its module's type alone.
    ``channel_axis`` is the axis used (``None`` before the first record).
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
        *,
        channel_axis: int | None = None,
        **kwargs,
    ):
        if method not in ("before", "after"):
            raise OptionError(f"a StateCaptureHook's method is 'before' or 'after', got {method!r}")
        meta = {"method": method, "framework": "torch", **(metadata or {})}
        super().__init__(name, disk_path, keep_states, overwrite, meta, **kwargs)
        self.method = method
        #: The caller's neuron axis (``channel_axes``), or ``None`` to follow the rule.
        self.axis_override = channel_axis
        #: Whether the neuron axis had to be guessed (the last axis, with a warning).
        self.axis_guessed = False
        self._tracker: AxisTracker | None = None
        # The last batch's layout when the next one of the same shape may skip the
        # rules (see _record_as_before); None until then.
        self._known_layout: tuple | None = None
        self._layout_seen: tuple | None = None  # what record_tensor last decided, for record_from

    def __call__(self, module, args, *rest):
        """Forward hook ``(module, args, output)`` / ``(module, args, kwargs, output)``
        or pre-hook ``(module, args)`` / ``(module, args, kwargs)``."""
        if not self.capture_on or exporting():
            return None
        if self.method == "after":
            value = rest[-1] if rest else None
        else:
            value = first_tensor(args)
            if value is None and rest and isinstance(rest[0], dict):
                value = first_tensor(rest[0])
        tensor = first_tensor(value)
        if tensor is not None:
            _record_eagerly(self, module, tensor)
        return None

    def record_from(self, module: torch.nn.Module, tensor: torch.Tensor) -> None:
        """Record the tensor a hook on ``module`` received, on the axis the rule gives
        (see the module docstring); with no rule, once a reader decides or guessed."""
        if self._record_as_before(module, tensor):
            return
        self._known_layout = None
        if not self.capture_on or not is_real_tensor(tensor) or tracing() or tensor.dim() == 0:
            return
        self._check_dtype(tensor)
        axis = None if self.axis_override is not None else self._rule_axis(module, tensor)
        if axis is not None or self.axis_override is not None:
            self._layout_seen = None
            self.record_tensor(tensor, axis)
            if self._layout_seen is not None and (tensor.dim() <= 2 or self.axis_fixed(module)):
                self._known_layout = (module, self.axis_override, *self._layout_seen)
        elif self._tracker is not None and self._tracker.in_pass():
            self._tracker.defer(self, tensor)
        else:
            self.record_guessed(tensor)

    def _record_as_before(self, module: torch.nn.Module, tensor: torch.Tensor) -> bool:
        """Record ``tensor`` laid out as the last batch this hook recorded from
        ``module`` (a CPU tensor of the same shape and dtype, the pass's batch
        size the same, no mask, an axis the module fixes), skipping the rules,
        which would decide as they did then; return whether it did.

        A hook runs right after its module has streamed its output through the
        caches, so every line of Python it runs is a cache miss: the rules
        took 50-100 us a call there (13 us with warm caches), against ~35 us
        for this check."""
        known = self._known_layout
        if known is None or type(tensor) is not torch.Tensor or not self.capture_on:
            return False
        tracker = self._tracker
        batch_size = None if tracker is None else tracker.batch_size
        mask = None if tracker is None else tracker.mask
        held_module, override, shape, dtype, layout_batch, axis, instances = known
        if (
            held_module is not module or override != self.axis_override or mask is not None
            or tensor.shape != shape or tensor.dtype != dtype or batch_size != layout_batch
            or tensor.device.type != "cpu" or tensor.layout is not torch.strided
            or self.sample_axis != 0 or tracing()
        ):  # fmt: skip
            return False
        self.record_packed(pack(tensor.detach().numpy(), axis), shape[axis], instances)
        return True

    def axis_fixed(self, module: torch.nn.Module) -> bool:
        """Whether this hook's neuron axis on ``module`` never needs the tensors
        of the pass followed: the caller's override, or a module whose kind
        fixes it (a conv-family module, a dense module's output)."""
        return self.axis_override is not None or self._kind_axis(module_kind(module), 3) is not None

    def _kind_axis(self, kind, rank: int) -> int | None:
        """The neuron axis a module of ``kind`` fixes for this hook's tensor of
        ``rank`` > 2, or ``None`` when it depends on what made the tensor."""
        if kind == CHANNELS:  # its output, or what it reads as channels
            return 1
        if kind == FEATURES and self.method == "after":
            return rank - 1
        return None

    def _rule_axis(self, module: torch.nn.Module, tensor: torch.Tensor) -> int | None:
        """The neuron axis of ``tensor`` by the rule, or ``None`` if nothing decides it yet."""
        rank = tensor.dim()
        if rank <= 2:
            return plain_axis(rank)
        kind = module_kind(module)
        fixed = self._kind_axis(kind, rank)
        if fixed is not None:
            return fixed
        axis = None if self._tracker is None else self._tracker.axis_of(tensor)
        if axis is None and kind == FEATURES:  # what a dense module reads as features
            return rank - 1
        return axis

    def record_guessed(self, tensor: torch.Tensor) -> None:
        """Record ``tensor`` on its last axis, warning once that the axis is a guess."""
        if self.axis_override is None and not self.axis_guessed:
            self.axis_guessed = True
            warn_guessed(self.name, tuple(tensor.shape), plain_axis(tensor.dim()),
                         "made by a module or torch function of unknown layout")  # fmt: skip
        self.record_tensor(tensor, plain_axis(tensor.dim()))

    def _check_dtype(self, tensor: torch.Tensor) -> None:
        if tensor.dtype not in _FLOAT_DTYPES:
            raise dtype_error(self.name, str(tensor.dtype).replace("torch.", ""))

    def record_tensor(self, tensor: torch.Tensor, channel_axis: int | None = None) -> None:
        """Record one batch held in a float torch tensor with its neurons on ``channel_axis``.

        The probe's ``channel_axes`` override wins. Without either, rank-1 and
        rank-2 tensors follow the rule (one neuron per sample; the last axis) and
        larger ones take the last axis with a warning. Integer and bool tensors
        raise :class:`~tensorstate_onnx.errors.ProbeDtypeError`.
        """
        if not self.capture_on or not is_real_tensor(tensor) or tracing() or tensor.dim() == 0:
            return
        self._check_dtype(tensor)
        if self.axis_override is not None:
            channel_axis = checked_override(self.name, self.axis_override, self.name, tuple(tensor.shape))
        elif channel_axis is None:
            if tensor.dim() > 2:
                self.record_guessed(tensor)
                return
            channel_axis = plain_axis(tensor.dim())
        if tensor.numel() == 0:
            return
        if tensor.dim() == 1:
            tensor = tensor.reshape(-1, 1)  # one neuron per sample
        axis = channel_axis % tensor.dim()
        batch_size = None if self._tracker is None else self._tracker.batch_size
        first = self.find_sample_axis(tuple(tensor.shape), axis, batch_size)
        instances = int(tensor.shape[first]) if first else batch_instances(tuple(tensor.shape), axis)
        mask = None if self._tracker is None else self._tracker.mask
        keep = positions_kept(mask, tensor.numel() // tensor.shape[axis], instances, self.name)
        if tensor.device.type == "cpu":
            data = tensor.detach()
            if data.dtype not in _NUMPY_DTYPES:  # bfloat16: the firing pattern only
                data = data > 0
            elif keep is None and first == 0:
                self._layout_seen = (tuple(tensor.shape), tensor.dtype, batch_size, axis, instances)
            self.record(data.numpy(), axis, keep, batch_size)
            return
        self.channel_axis = axis
        if first:  # samples first, as on the host (see capture.batch_axis)
            tensor, axis = tensor.movedim(first, 0), axis + (axis < first)
        packed = pack_tensor(tensor.detach(), axis)
        self.record_packed(packed, tensor.shape[axis], instances, keep)


# --------------------------------------------------------------------------- attaching


def _module_keys(qualname: str, module: torch.nn.Module) -> set[str]:
    cls = type(module)
    keys = {cls.__name__, f"{cls.__module__}.{cls.__qualname__}"}
    if qualname:
        keys.add(qualname)
    return keys


def match_modules(module: torch.nn.Module, attach_to, exclude=()) -> list[tuple[str, torch.nn.Module]]:
    """``(qualified name, submodule)`` of every submodule of ``module`` that
    :func:`attach_hooks` would probe for ``attach_to`` and ``exclude``, in module order.

    Raises ProbeMatchError (naming the modules present) when none matches.
    """
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
    return chosen


def attach_hooks(
    module: torch.nn.Module,
    attach_to,
    exclude=(),
    method: str = "after",
    storage_path: str | os.PathLike | None = None,
    *,
    keep_states: bool = True,
    overwrite: bool = False,
    channel_axes: dict[str, int] | None = None,
    mask_input: str | None = None,
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
        overwrite: allow a ``storage_path`` that is not empty: each probe replaces
            its store there, and once one has written, the stores an earlier run
            left there for other probes are deleted (other files stay).
        channel_axes: ``{probe name: axis}`` (or ``{module name: axis}`` for both
            of its probes) overriding the neuron axis the rule gives (see the
            module docstring); each axis is checked against its tensor's rank
            when the probe records.
        mask_input: name of an argument of ``module.forward`` (``attention_mask``)
            whose zero positions are not recorded: states of probes with one
            state per position (``[batch, length, features]``) at those positions
            are neither counted nor stored, as on the ONNX path.

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
        ChannelAxisError: a ``channel_axes`` key names no probe (and, when the
            probe records, an axis out of range for its tensor).
        ProbeDtypeError: (when a probe records) its tensor is integer or bool.
        StorageExistsError: ``storage_path`` is a file, cannot be written, or is
            a directory that is not empty and ``overwrite`` is false.
    """
    if not isinstance(module, torch.nn.Module):
        raise OptionTypeError(f"attach_hooks takes a torch.nn.Module, got {type(module).__name__}")
    methods = probe_methods(method)
    chosen = match_modules(module, attach_to, exclude)

    overrides = dict(channel_axes or {})
    labels = [name or type(sub).__name__ for name, sub in chosen]
    check_override_keys(overrides, [f"{label}:{m}" for label in labels for m in methods], labels)

    root = None if storage_path is None else Path(storage_path)
    if root is not None:
        check_storage_root(root, overwrite)
    remove_state_layers(module)
    hooks: list[StateCaptureHook] = []
    handles = []
    used_dirs: set[str] = set()
    tracker = AxisTracker(mask_input)
    axes_fixed = True
    try:
        for (name, sub), label in zip(chosen, labels):
            for m in methods:
                capture_name = f"{label}:{m}"
                disk_path = None if root is None else root / unique_store_dirname(capture_name, used_dirs)
                metadata = {"module": name, "module_class": type(sub).__name__}
                hook = StateCaptureHook(
                    capture_name, disk_path, m, keep_states=keep_states, overwrite=overwrite,
                    metadata=metadata, channel_axis=overrides.get(capture_name, overrides.get(label)),
                )
                hook._tracker = tracker
                tracker.hooks.append(hook)
                if m == "before":
                    handles.append(sub.register_forward_pre_hook(hook, with_kwargs=True))
                else:
                    handles.append(sub.register_forward_hook(hook))
                hooks.append(hook)
                axes_fixed = axes_fixed and hook.axis_fixed(sub)
        # Every module is followed only when some probe's axis depends on what made its
        # tensor; otherwise the passes are tracked only through the modules that lead to a probe.
        handles.extend(tracker.attach(module, None if not axes_fixed else _leading_to(module, [n for n, _ in chosen])))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    sweep_stale_stores(hooks, root, overwrite)
    setattr(module, _HANDLES_ATTR, handles)
    module.efficiency_layers = hooks
    return module


def _leading_to(module: torch.nn.Module, names: list[str]) -> list[torch.nn.Module]:
    """``module`` and its submodules that are one of ``names`` (qualified names)
    or contain one: every call that reaches a probe passes through them."""
    wanted = {""}
    for name in names:
        parts = name.split(".") if name else []
        wanted.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
    found: dict[int, torch.nn.Module] = {}
    for name, sub in module.named_modules(remove_duplicate=False):
        if name in wanted:
            found.setdefault(id(sub), sub)
    return list(found.values())


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
