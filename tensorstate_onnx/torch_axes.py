"""Where the neurons of a PyTorch tensor are: the module-kind rules of DESIGN §1
and the tracker that follows tensors through a forward pass to apply them.

Each module type has a kind: conv family (neurons on axis 1), dense and sequence
(last axis), elementwise (the layout of what it reads), shape modules that carry
the axis (Flatten, Unflatten, Permute), or other. :class:`AxisTracker` puts
light hooks on every submodule and records which module produced each tensor,
so a probe on an elementwise module learns the axis of its input's producer.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import ModelInputError
from .graph.layout import reshaped_axis
from .patterns import preview

if TYPE_CHECKING:
    from .torch_capture import StateCaptureHook

__all__ = [
    "CHANNELS", "FEATURES", "AxisTracker", "disable_compile", "exporting", "first_tensor", "is_real_tensor",
    "module_kind", "plain_axis", "tracing",
]  # fmt: skip

# ------------------------------------------------------------------ forward-pass plumbing


def is_real_tensor(value) -> bool:
    """A concrete tensor with data (not a fake/meta tensor seen while tracing or exporting)."""
    if not isinstance(value, torch.Tensor) or value.is_meta:
        return False
    if type(value) is not torch.Tensor and not isinstance(value, torch.nn.Parameter):
        return False  # FakeTensor, FunctionalTensor and other tracing subclasses
    return not value.is_sparse and not value.is_quantized and not value.is_complex()


def tracing() -> bool:
    """Whether torch is tracing (export, compile, TorchScript) rather than running."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None:
        for check in ("is_exporting", "is_compiling"):
            func = getattr(compiler, check, None)
            if func is not None and func():
                return True
    return torch.jit.is_tracing() or torch.jit.is_scripting()


def exporting() -> bool:
    """Whether the module is being traced for export (torch.export, TorchScript)."""
    is_exporting = getattr(getattr(torch, "compiler", None), "is_exporting", None)
    return bool(is_exporting is not None and is_exporting()) or torch.jit.is_tracing()


def disable_compile(func):
    """Keep ``func`` out of ``torch.compile`` graphs: dynamo breaks the graph and runs
    it eagerly on real tensors, so compiled modules record too.

    Outside compilation ``func`` is called directly: a call through dynamo's
    ``disable`` wrapper cost 20-30 us inside a model's forward pass (measured on
    MobileNetV2Small, where the hooks and the tracker make ~130 such calls a
    batch), and eager code needs none of it. While dynamo traces,
    ``is_compiling()`` is true, so the traced branch is the disabled call."""
    compiler = getattr(torch, "compiler", None)
    disable = getattr(compiler, "disable", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    if disable is None or is_compiling is None:
        return func if disable is None else disable(func)
    disabled = disable(func)

    @functools.wraps(func)
    def call(*args, **kwargs):
        if is_compiling():
            return disabled(*args, **kwargs)
        return func(*args, **kwargs)

    return call


def first_tensor(values) -> torch.Tensor | None:
    """The first tensor in a (nested) structure of tuples, lists and dicts, in order."""
    if isinstance(values, torch.Tensor):
        return values
    if isinstance(values, dict):
        values = values.values()
    if isinstance(values, (tuple, list, type({}.values()))):
        for item in values:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


# ------------------------------------------------------------------ module kinds

CHANNELS = "channels"  # neurons on axis 1 of the output (and of what it reads)
FEATURES = "features"  # neurons on the last axis
_ELEMENTWISE = "elementwise"  # the output has the layout of the input
_FLATTEN, _UNFLATTEN, _PERMUTE = "flatten", "unflatten", "permute"
_OTHER = "other"  # containers and modules of unknown type: follow the tensors


def _classes(namespace, names) -> tuple[type, ...]:
    found = (getattr(namespace, name, None) for name in names)
    return tuple(cls for cls in found if isinstance(cls, type))


@functools.cache
def _kind_classes() -> tuple[tuple[str, tuple[type, ...]], ...]:
    """(kind, classes) in the order they are tried (a subclass counts as its base)."""
    nn, modules = torch.nn, torch.nn.modules
    channels = (
        _classes(modules.conv, ["_ConvNd"])
        + _classes(modules.batchnorm, ["_NormBase"])  # BatchNorm*d, InstanceNorm*d, SyncBatchNorm
        + _classes(modules.pooling, ["_MaxPoolNd", "_AvgPoolNd", "_AdaptiveAvgPoolNd",
                                     "_AdaptiveMaxPoolNd", "_LPPoolNd", "_MaxUnpoolNd"])
        + _classes(nn, ["FractionalMaxPool2d", "FractionalMaxPool3d", "GroupNorm",
                        "LocalResponseNorm", "CrossMapLRN2d", "PixelShuffle", "PixelUnshuffle",
                        "ChannelShuffle"])
    )  # fmt: skip
    features = _classes(
        nn,
        ["Linear", "Bilinear", "LayerNorm", "RMSNorm", "Embedding", "EmbeddingBag",
         "MultiheadAttention", "RNNBase", "RNNCellBase", "Transformer", "TransformerEncoder",
         "TransformerDecoder", "TransformerEncoderLayer", "TransformerDecoderLayer"],
    )  # fmt: skip
    elementwise = tuple(
        cls
        for namespace in (modules.activation, modules.dropout, modules.padding)
        for cls in vars(namespace).values()
        if isinstance(cls, type) and issubclass(cls, nn.Module) and cls is not nn.Module
        and not issubclass(cls, features)
    ) + _classes(nn, ["Identity", "Upsample"])
    return (
        (FEATURES, features),
        (CHANNELS, channels),
        (_ELEMENTWISE, elementwise),
        (_FLATTEN, _classes(nn, ["Flatten"])),
        (_UNFLATTEN, _classes(nn, ["Unflatten"])),
    )


@functools.cache
def _reimplements_forward(cls: type) -> bool:
    """Whether ``cls`` has a forward of its own, not the one of the PyTorch class it extends."""
    base = next((c for c in cls.__mro__ if c.__module__.startswith("torch.")), None)
    return base is not None and getattr(cls, "forward", None) is not getattr(base, "forward", None)


def module_kind(module: torch.nn.Module) -> str:
    """How ``module``'s output lays out its neurons (one of the kinds above). A dense
    class extended with a forward of its own may lay its output out otherwise
    (torchvision's ``LayerNorm2d`` normalizes ``[N, C, H, W]`` tensors through a
    permute): it is of no kind, and what reads its output decides."""
    for kind, classes in _kind_classes():
        if isinstance(module, classes):
            if kind == FEATURES and _reimplements_forward(type(module)):
                break
            return kind
    # torchvision.ops.misc.Permute (ConvNeXt's NCHW <-> NHWC) and look-alikes.
    cls = type(module)
    if cls.__name__ == "Permute" and isinstance(getattr(module, "dims", None), (list, tuple)):
        return _PERMUTE
    # Hugging Face transformers: its Conv1D is a dense layer (GPT-2), its activations elementwise.
    if cls.__module__.startswith("transformers."):
        if cls.__name__ == "Conv1D":
            return FEATURES
        if cls.__module__ == "transformers.activations":
            return _ELEMENTWISE
    return _OTHER


def _shape_op_axis(kind: str, module, axis: int, rank_in: int, rank_out: int) -> int | None:
    """Where axis ``axis`` of the input of a Flatten, Unflatten or Permute module lands
    in its output; ``None`` when the module merges or splits that axis."""
    if kind == _PERMUTE:
        dims = [d % rank_in for d in module.dims]
        return dims.index(axis) if len(dims) == rank_in and axis in dims else None
    if kind == _FLATTEN:
        start, end = module.start_dim % rank_in, module.end_dim % rank_in
        if axis < start:
            return axis
        if axis > end:
            return axis - (end - start)
        return None if end > start else axis
    dim = module.dim % rank_in if isinstance(module.dim, int) else None  # Unflatten
    if dim is None or axis == dim:
        return None
    return axis if axis < dim else axis + rank_out - rank_in


def _unit_free(shape) -> tuple[list[int], list[int]]:
    """The dimensions of ``shape`` that are not 1, and their positions."""
    kept = [k for k, d in enumerate(shape) if d != 1]
    return [shape[k] for k in kept], kept


def _memory_order(tensor: torch.Tensor) -> tuple[int, ...] | None:
    """The non-unit dimensions of ``tensor`` from outermost to innermost in memory;
    ``None`` when strides do not tell (a broadcast dimension, equal strides)."""
    dims = [k for k in range(tensor.dim()) if tensor.shape[k] != 1]
    try:
        strides = [tensor.stride(k) for k in dims]
    except (RuntimeError, NotImplementedError):  # sparse and other layouts without strides
        return None
    if 0 in strides or len(set(strides)) != len(strides):
        return None
    return tuple(k for _, k in sorted(zip(strides, dims), reverse=True))


def _carried_axis(shape, source_shape, source_axis: int, order=None, source_order=None) -> int | None:
    """The axis of a tensor of ``shape`` made from one of ``source_shape`` (axis
    ``source_axis``) by an elementwise op, a squeeze or an unsqueeze: the same
    dimensions once the unit ones are dropped. ``None`` when they differ or the
    neuron axis is itself a unit dimension, and when the shapes are equal but the
    memory orders (see :func:`_memory_order`) differ: a transpose of equal-sized
    dimensions (``[B, C, L]`` to ``[B, L, C]`` with ``C == L``) keeps the shape but
    shows in the strides of its view and of what elementwise ops make of it."""
    if tuple(shape) == tuple(source_shape):
        if order is not None and source_order is not None and order != source_order:
            return None
        return source_axis
    dims, positions = _unit_free(shape)
    source_dims, source_positions = _unit_free(source_shape)
    if dims != source_dims or source_axis not in source_positions:
        return None
    return positions[source_positions.index(source_axis)]


def _in_order(order: tuple[int, ...] | None) -> bool:
    return order is not None and list(order) == sorted(order)


def _reshaped_whole(shape, source_shape, source_axis: int, order, source_order) -> int | None:
    """The axis of a tensor of ``shape`` made from one of ``source_shape`` by a
    reshape that leaves axis ``source_axis`` whole (``[N, C, H, W]`` to ``[N, C,
    H*W]``: the ONNX path's Reshape rule), when nothing else could have made it:
    both laid out in order (no transpose before the reshape) and the axis's size
    found once past the batch axis; ``None`` otherwise."""
    if int(np.prod(shape)) != int(np.prod(source_shape)) or not (_in_order(order) and _in_order(source_order)):
        return None
    moved, _ = reshaped_axis(source_axis, list(source_shape), list(shape))
    if moved is None or moved == 0 or list(shape[1:]).count(shape[moved]) > 1:
        return None
    return moved


class _Frame:
    """What one module call has seen so far: its input and its children's outputs."""

    __slots__ = ("module", "input_axis", "input_rank", "seen")

    def __init__(self, module, input_axis, input_rank, seen):
        self.module = module
        self.input_axis = input_axis
        self.input_rank = input_rank
        self.seen = seen  # [(shape, axis, memory order)], in the order the tensors appeared

    def match(self, tensor: torch.Tensor) -> int | None:
        """The axis of the latest seen tensor that ``tensor`` carries (same dimensions up
        to unit ones, laid out alike): a tensor made from it by a plain torch function."""
        order = _memory_order(tensor)
        for source_shape, axis, source_order in reversed(self.seen):
            carried = _carried_axis(tensor.shape, source_shape, axis, order, source_order)
            if carried is not None:
                return carried
        for source_shape, axis, source_order in reversed(self.seen):
            moved = _reshaped_whole(tuple(tensor.shape), source_shape, axis, order, source_order)
            if moved is not None:
                return moved
        return None


class AxisTracker:
    """Follows the tensors of a forward pass to give every tensor its neuron axis:
    hooks on every submodule of the probed module record which module produced
    each tensor.

    Entries are keyed by ``id`` and checked through a weak reference, so a stale
    entry never applies to a new tensor; they are dropped at the start of every
    pass (the outermost module call). Probes whose axis nothing has decided when they
    record wait (on a copy of the tensor) for a conv-family or dense module to
    read that tensor, and take the last axis with a warning if none does before
    the pass ends.
    """

    def __init__(self, mask_input: str | None = None):
        self.mask_input = mask_input
        #: The pass's mask (``[batch, length]``, true where real), from the root call's
        #: ``mask_input`` argument; None without one.
        self.mask: np.ndarray | None = None
        #: The pass's batch size: the length of axis 0 of the first tensor the call
        #: that opened it received (None without one), as the ONNX path takes it from
        #: its first input; probes find their batch axis by it (``capture.batch_axis``).
        self.batch_size: int | None = None
        self._root: torch.nn.Module | None = None
        self._known: dict[int, tuple[weakref.ref, int]] = {}
        self._frames: list[_Frame] = []
        self._pending: list[tuple[weakref.ref, torch.Tensor, "StateCaptureHook"]] = []
        #: The probes of the model: what they record in a pass is counted when the
        #: pass ends, and dropped if it raises.
        self.hooks: list["StateCaptureHook"] = []

    def attach(self, module: torch.nn.Module, within: list | None = None) -> list:
        """Register the tracking hooks on every submodule of ``module`` (or on the
        modules ``within`` only, ``module`` among them: then passes are opened,
        closed and masked, but no tensor's axis is followed); return their handles."""
        self._root = module
        opened, closed = (self._before, self._after) if within is None else (self._enter, self._leave)
        eager_before, eager_after = disable_compile(opened), disable_compile(closed)

        # Checked before the compile-disabled call, which strict torch.export refuses.
        def before(module, args, kwargs):
            return None if exporting() else eager_before(module, args, kwargs)

        def after(module, args, output):
            return None if exporting() else eager_after(module, args, output)

        def ended(module, args, output):
            return None if exporting() else self._ended(module)

        handles = []
        for sub in module.modules() if within is None else within:
            handles.append(sub.register_forward_pre_hook(before, with_kwargs=True, prepend=True))
            handles.append(sub.register_forward_hook(after, prepend=True))
            handles.append(sub.register_forward_hook(ended, always_call=True))
        return handles

    # ---------------------------------------------------------------- lookups

    def axis_of(self, tensor: torch.Tensor) -> int | None:
        """The known neuron axis of ``tensor``, else the one it carries from a tensor the
        current module call saw (see :meth:`_Frame.match`), else ``None``."""
        entry = self._known.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[1]
        if self._frames:
            return self._frames[-1].match(tensor)
        return None

    def _remember(self, tensor: torch.Tensor, axis: int) -> None:
        self._known[id(tensor)] = (weakref.ref(tensor), axis)

    def in_pass(self) -> bool:
        """Whether a forward pass is running (a module call has not returned yet)."""
        return bool(self._frames)

    def defer(self, hook: "StateCaptureHook", tensor: torch.Tensor) -> None:
        """Record ``tensor`` for ``hook`` once a reader decides its axis (or at the end)."""
        self._pending.append((weakref.ref(tensor), tensor.detach().clone(), hook))

    # ----------------------------------------------------------------- hooks

    def _open_pass(self, module, args, kwargs) -> None:
        """A new pass begins (of the root module, or of a submodule called alone)."""
        self._known.clear()
        self.mask = self._mask_of(module, args, kwargs)
        first = first_tensor((args, kwargs))
        self.batch_size = int(first.shape[0]) if first is not None and first.dim() > 0 else None
        for hook in self.hooks:
            hook.hold()

    def _close_pass(self) -> None:
        """The pass is over: no module will read a waiting tensor now."""
        self._flush()
        for hook in self.hooks:
            hook.commit()

    def _enter(self, module, args, kwargs):
        """A module call begins, when no tensor is followed."""
        if not self._frames:
            self._open_pass(module, args, kwargs)
        self._frames.append(_Frame(module, None, None, ()))
        return None

    def _leave(self, module, args, output):
        """A module call returns, when no tensor is followed."""
        if self._pop_frame(module) is not None and not self._frames:
            self._close_pass()
        return None

    def _pop_frame(self, module) -> _Frame | None:
        """The frame of ``module``'s call, taken off the stack with any left above it
        (a call that raised inside it); ``None`` if ``module`` has no open call."""
        frames = self._frames
        if frames and frames[-1].module is module:
            return frames.pop()
        depth = next((k for k in range(len(frames) - 1, -1, -1) if frames[k].module is module), None)
        if depth is None:
            return None
        frame = frames[depth]
        del frames[depth:]
        return frame

    def _before(self, module, args, kwargs):
        if not self._frames:
            self._open_pass(module, args, kwargs)
        tensor = first_tensor(args)
        if tensor is None:
            tensor = first_tensor(kwargs)
        axis = rank = None
        if tensor is not None and is_real_tensor(tensor) and tensor.dim() > 0:
            rank = tensor.dim()
            axis = self.axis_of(tensor)
            kind = module_kind(module)
            if axis is None and kind in (CHANNELS, FEATURES):
                # What a conv-family module reads as channels, a dense module as features.
                axis = plain_axis(rank) if rank <= 2 else (1 if kind == CHANNELS else rank - 1)
                self._resolve(tensor, axis)
            if axis is not None:
                self._remember(tensor, axis)
        seen = [] if axis is None else [(tuple(tensor.shape), axis, _memory_order(tensor))]
        self._frames.append(_Frame(module, axis, rank, seen))
        return None

    def _after(self, module, args, output):
        frame = self._pop_frame(module)
        if frame is None:
            return None
        tensor = first_tensor(output)
        if tensor is not None and is_real_tensor(tensor) and tensor.dim() > 0:
            axis = self._output_axis(module, frame, tensor)
            if axis is not None:
                self._remember(tensor, axis)
                if self._frames:
                    self._frames[-1].seen.append((tuple(tensor.shape), axis, _memory_order(tensor)))
        if not self._frames:
            self._close_pass()
        return None

    def _mask_of(self, module, args, kwargs) -> np.ndarray | None:
        """The ``mask_input`` argument of a pass's root call, as booleans (true where real)."""
        if self.mask_input is None or module is not self._root:
            return None
        value = kwargs.get(self.mask_input)
        if value is None:
            try:
                value = inspect.signature(module.forward).bind_partial(*args, **kwargs).arguments.get(self.mask_input)
            except TypeError:
                value = None
        if value is None:
            raise ModelInputError(
                f"mask_input {self.mask_input!r} was not passed to {type(module).__name__}.forward; pass it "
                "(e.g. model(input_ids, attention_mask=mask)) or attach the hooks without mask_input"
            )
        return (torch.as_tensor(value).detach() != 0).cpu().numpy()

    def _ended(self, module) -> None:
        """After any call of ``module``, normal or raising: if it began the pass and the
        pass is still open, it raised, and what the pass recorded is dropped."""
        if not self._frames or self._frames[0].module is not module:
            return
        self._frames.clear()
        self._pending.clear()
        self._known.clear()
        dropped = [hook.name for hook in self.hooks if hook.drop()]
        if dropped:
            warnings.warn(
                f"the forward pass of {type(module).__name__} raised; the states it had recorded in "
                f"{len(dropped)} probe(s) ({preview(dropped, 5)}) "
                "were dropped, so every probe still holds the same batches",
                RuntimeWarning,
                stacklevel=3,
            )

    def _output_axis(self, module, frame: _Frame, tensor: torch.Tensor) -> int | None:
        rank = tensor.dim()
        kind = module_kind(module)
        if kind == CHANNELS:
            return plain_axis(rank) if rank <= 2 else 1
        if kind == FEATURES:
            return plain_axis(rank)
        if frame.input_axis is not None and kind == _ELEMENTWISE:
            if rank == frame.input_rank:
                return frame.input_axis
            return frame.input_axis + rank - frame.input_rank if rank > frame.input_rank else None
        if frame.input_axis is not None and kind in (_FLATTEN, _UNFLATTEN, _PERMUTE):
            moved = _shape_op_axis(kind, module, frame.input_axis, frame.input_rank, rank)
            return plain_axis(rank) if moved is None else moved
        entry = self._known.get(id(tensor))
        if entry is not None and entry[0]() is tensor:
            return entry[1]  # a submodule produced it
        axis = frame.match(tensor)
        if axis is None and rank <= 2:
            return plain_axis(rank)
        return axis

    def _resolve(self, tensor: torch.Tensor, axis: int) -> None:
        """Record the waiting copies of ``tensor`` on ``axis``."""
        waiting = [entry for entry in self._pending if entry[0]() is tensor]
        if not waiting:
            return
        self._pending = [entry for entry in self._pending if entry[0]() is not tensor]
        for _, copy, hook in waiting:
            hook.record_tensor(copy, axis)

    def _flush(self) -> None:
        """Record every copy still waiting, on the last axis, with a warning."""
        pending, self._pending = self._pending, []
        for _, copy, hook in pending:
            hook.record_guessed(copy)


def plain_axis(rank: int) -> int:
    """The last axis; for a rank-1 ``[N]`` tensor axis 1 of its ``[N, 1]`` view."""
    return 1 if rank == 1 else rank - 1
