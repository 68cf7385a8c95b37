"""ONNX files and whole-model passes: loading, saving, the checker, shape inference.

The checker and shape inference never see a model's weights: they run on its
weightless skeleton (:func:`skeleton`: every large initializer reduced to a
graph input of its type and shape, the data sizes checked here), so a model is
not copied or serialized whole to be checked or typed. Models over
:data:`EXTERNAL_DATA_THRESHOLD` are saved with external data, because protobuf
cannot serialize more than 2 GiB in one piece.
"""

from __future__ import annotations


import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper

from ..errors import ModelFileError, OptionTypeError, first_line

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "check_external_data",
    "check_model",
    "elem_type_of",
    "holds_plain_bytes",
    "infer_types",
    "load_model",
    "needs_external_data",
    "raw_data_size",
    "save_model",
    "shape_of",
    "skeleton",
    "split_weights",
]

#: Models whose serialized size exceeds this many bytes are shape-inferred, checked
#: and saved through files with external data. Protobuf's hard limit is 2 GiB; the
#: margin leaves room for the outputs and nodes the rewriter adds. Read here only:
#: to change it (tests do), patch ``tensorstate_onnx.graph.io.EXTERNAL_DATA_THRESHOLD``.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27

#: Initializers with more elements than this are left out of a model's skeleton.
#: Shape inference reads the values of small integer tensors only (Reshape targets,
#: Slice bounds, ...), which stay.
SKELETON_MAX_ELEMENTS = 1024


def load_model(model: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """Return ``model`` as a ModelProto, reading and validating it if it is a path.

    A ModelProto is returned as is. A path is read together with the external data
    stored beside it and checked with ``onnx.checker``; every way a file can be
    wrong (missing, a directory, not ONNX, truncated, invalid) raises
    :class:`ModelFileError` with a hint on what to do.
    """
    if isinstance(model, onnx.ModelProto):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise OptionTypeError(
            f"model must be an onnx.ModelProto or a path to an .onnx file, "
            f"not {type(model).__name__}"
        )
    path = Path(model)
    _require_file(path)
    proto = _read_model(path)
    try:
        check_model(proto)
    except (onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        raise ModelFileError(
            f"{path} is not a valid ONNX model ({first_line(exc)}); re-export it "
            "or repair it so that onnx.checker.check_model accepts it"
        ) from exc
    return proto


def _require_file(path: Path) -> None:
    """Raise ModelFileError unless ``path`` names an existing regular file."""
    if not path.exists():
        raise ModelFileError(f"ONNX model file {path} does not exist; check the path")
    if path.is_dir():
        raise ModelFileError(
            f"{path} is a directory, not an ONNX file; pass the path of the .onnx "
            "file inside it"
        )


def _tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor a graph holds: initializers and tensor attributes, subgraphs included."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            for subgraph in (attribute.g, *attribute.graphs) if attribute.HasField("g") else attribute.graphs:
                yield from _tensors(subgraph)


def check_external_data(proto: onnx.ModelProto, folder: Path) -> None:
    """Refuse external data that would be read from outside the model's folder.

    A location must be a relative path to a regular file inside ``folder``
    (not a symbolic link, which onnx refuses too): an absolute path, ``..``, a
    link out of the folder or a device file could make loading a model read
    any file.
    """
    root = folder.resolve()
    for tensor in _tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((entry.value for entry in tensor.external_data if entry.key == "location"), "")
        target = (root / location).resolve()
        if not location or Path(location).is_absolute() or not target.is_relative_to(root):
            raise ModelFileError(
                f"tensor {tensor.name!r} of the model keeps its data at {location!r}, outside the model's "
                f"folder {root}; only files beside the model (or below it) are read: move the data there "
                "and re-save the model with a relative location"
            )
        if (root / location).is_symlink():
            raise ModelFileError(
                f"tensor {tensor.name!r} of the model keeps its data in {location!r}, a symbolic link; "
                "onnx reads external data only from regular files: put a copy of the file there"
            )
        if not target.is_file():
            raise ModelFileError(
                f"tensor {tensor.name!r} of the model keeps its data in {target}, which is not a regular "
                "file; keep the model's external data files beside the .onnx file"
            )


def _read_model(path: Path) -> onnx.ModelProto:
    """Parse ``path`` (and its external data) into a ModelProto or raise ModelFileError."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise ModelFileError(
            f"{path} could not be parsed as an ONNX model (corrupt, truncated or not "
            "ONNX at all); re-export or re-download it"
        ) from exc
    except OSError as exc:
        raise ModelFileError(f"{path} could not be read ({first_line(exc)})") from exc
    if not proto.HasField("graph"):
        raise ModelFileError(
            f"{path} holds no ONNX graph; it is not an ONNX model file"
        )
    check_external_data(proto, path.parent)
    try:
        onnx.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ModelFileError(
            f"the external data of {path} could not be read ({first_line(exc)}); "
            "keep the model's external data files beside the .onnx file"
        ) from exc
    return proto


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None
) -> Path:
    """Write ``model`` to ``path`` and return the path, so onnxruntime can open it.

    ``external_data=None`` stores the weights in ``<file name>.data`` beside the
    model only when the model is over :data:`EXTERNAL_DATA_THRESHOLD` (protobuf
    cannot serialize more than 2 GiB); ``True``/``False`` force either way. The
    ModelProto keeps its weights in memory afterwards.
    """
    path = Path(path)
    if external_data is None:
        external_data = needs_external_data(model)
    if external_data:
        _save_with_external_data(model, path)
    else:
        onnx.save_model(model, str(path))
    return path


def needs_external_data(model: onnx.ModelProto) -> bool:
    """Whether ``model`` must go through files with external data (over :data:`EXTERNAL_DATA_THRESHOLD`).

    The size of the large initializers is taken from their shapes and types (their
    data sizes are checked against them on loading): asking protobuf for the size
    of a whole model serializes its weights, about a second per 500 MB."""
    heavy = sum(raw_data_size(tensor) + 64 for tensor in model.graph.initializer if _is_heavy(tensor))
    if heavy == 0:
        return model.ByteSize() > EXTERNAL_DATA_THRESHOLD
    return heavy + skeleton(model).ByteSize() > EXTERNAL_DATA_THRESHOLD


def _save_with_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Save with weights in ``<name>.data`` beside ``path``, then reload them into ``model``.

    ``onnx.save_model`` strips the weights out of the proto it saves; reading them
    back keeps the caller's ModelProto usable.
    """
    location = path.name + ".data"
    # onnx appends to an existing data file, which would leave stale bytes behind.
    (path.parent / location).unlink(missing_ok=True)
    onnx.save_model(
        model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
        location=location,
    )  # fmt: skip
    onnx.load_external_data_for_model(model, str(path.parent))


def check_model(model: onnx.ModelProto, weights: bool = True) -> None:
    """Run ``onnx.checker`` on ``model`` without copying or serializing its weights.

    The checker runs on :func:`skeleton`, and the weights left out of it are
    checked here the way the checker would (the data size fits the shape and
    type; reading each one's size copies its bytes), raising
    ``onnx.checker.ValidationError`` like it. ``weights=False`` skips that for
    weights checked before (a rewritten model only adds copies of them).
    """
    light = skeleton(model)
    for tensor in model.graph.initializer:
        if weights and _is_heavy(tensor):
            _check_data_size(tensor)
    if not needs_external_data(light):
        onnx.checker.check_model(light)
        return
    with tempfile.TemporaryDirectory() as tmp:  # huge Constant nodes: through a file
        path = Path(tmp, "model.onnx")
        _save_with_external_data(light, path)
        onnx.checker.check_model(str(path))


def infer_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Map every tensor name with a known tensor type to that type.

    Shape inference runs on :func:`skeleton` (the weights' types and shapes are
    all it needs of them), with data propagation so that Reshape targets
    computed from shapes still give static dimensions. A model the inference
    cannot handle keeps whatever types it already declares (with a warning).
    """
    try:
        inferred = _run_shape_inference(skeleton(model))
    except (onnx.shape_inference.InferenceError, RuntimeError, ValueError) as exc:
        warnings.warn(
            f"ONNX shape inference failed ({first_line(exc)}); only the types the "
            "model declares are used",
            stacklevel=3,
        )
        inferred = model
    graph = inferred.graph
    types = {
        vi.name: vi.type
        for vi in (*graph.input, *graph.value_info, *graph.output)
        if vi.type.HasField("tensor_type")
    }
    for init in model.graph.initializer:
        types[init.name] = helper.make_tensor_type_proto(init.data_type, init.dims)
    return types


def _run_shape_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape-infer ``model`` in memory, or through temporary files when it is large."""
    if not needs_external_data(model):
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "model.onnx"), Path(tmp, "inferred.onnx")
        _save_with_external_data(model, src)
        onnx.shape_inference.infer_shapes_path(str(src), str(dst), data_prop=True)
        return onnx.load(str(dst), load_external_data=False)


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its weights, for the checker and shape inference.

    Every initializer of the main graph with more than
    :data:`SKELETON_MAX_ELEMENTS` elements held in ``raw_data``, and every one
    whose data is external, becomes a graph input of its element type and shape
    (an initializer is a graph input with a default value, so the graph stays
    valid and types the same); all else is copied as is. The copy costs the
    graph's structure, not its weights.
    """
    light = _without_initializers(model)
    declared = {value.name for value in model.graph.input}
    for tensor in model.graph.initializer:
        if not _is_heavy(tensor) and tensor.data_location != TensorProto.EXTERNAL:
            light.graph.initializer.append(tensor)
        elif tensor.name not in declared:
            light.graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, tensor.dims))
    return light


def split_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, bytes]]:
    """``model`` as a skeleton whose large initializers are external data, each in an
    in-memory file of its own, and those files' bytes by name.

    Handed to onnxruntime (``SessionOptions.add_external_initializers_from_files_in_memory``)
    a session is built without serializing the weights into the model's bytes:
    one copy of them (each tensor's bytes, read once) instead of the two (Python
    bytes and onnxruntime's own) a serialized model costs, and faster. ``model``
    is not changed (its weights cannot be moved out: protobuf frees a message's
    memory only with the whole message).
    """
    light = _without_initializers(model)
    files: dict[str, bytes] = {}
    for tensor in model.graph.initializer:
        if not _is_heavy(tensor):
            light.graph.initializer.append(tensor)
            continue
        name = f"tensorstate-weight-{len(files)}.bin"
        files[name] = tensor.raw_data
        ref = light.graph.initializer.add()
        ref.name, ref.data_type, ref.data_location = tensor.name, tensor.data_type, TensorProto.EXTERNAL
        ref.dims.extend(tensor.dims)
        for key, value in (("location", name), ("offset", "0"), ("length", str(len(files[name])))):
            entry = ref.external_data.add()
            entry.key, entry.value = key, value
    return light, files


def _without_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose main graph has no initializers (copying them is the
    cost the callers avoid; everything else is copied)."""
    light = onnx.ModelProto()
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(light, field, value)
    for field, value in model.graph.ListFields():
        if field.name != "initializer":
            _copy_field(light.graph, field, value)
    return light


def _copy_field(target, field, value) -> None:
    """Copy one set field (from ``ListFields``) into the message ``target``."""
    if field.is_repeated:
        getattr(target, field.name).extend(value)
    elif field.message_type is not None:
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


# Bytes per element of the types whose large initializers the skeleton leaves out
# (sub-byte, string and other rare types stay in it, for the checker itself).
_ITEMSIZES = {
    TensorProto.FLOAT: 4, TensorProto.FLOAT16: 2, TensorProto.BFLOAT16: 2, TensorProto.DOUBLE: 8,
    TensorProto.INT8: 1, TensorProto.UINT8: 1, TensorProto.BOOL: 1, TensorProto.INT16: 2,
    TensorProto.UINT16: 2, TensorProto.INT32: 4, TensorProto.UINT32: 4, TensorProto.INT64: 8,
    TensorProto.UINT64: 8,
}  # fmt: skip
_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def holds_plain_bytes(tensor: onnx.TensorProto) -> bool:
    """Whether ``tensor`` keeps its values, if any, as plain bytes in the model: data
    in place (not external), a common numeric type, no typed value fields, a
    shape without negative dimensions."""
    return (
        tensor.data_location == TensorProto.DEFAULT
        and tensor.data_type in _ITEMSIZES
        and not any(len(getattr(tensor, name)) for name in _TYPED_FIELDS)
        and min(tensor.dims, default=0) >= 0
    )


def _is_heavy(tensor: onnx.TensorProto) -> bool:
    """Whether an initializer is left out of the skeleton: many elements of a common
    numeric type held in ``raw_data`` alone (other cases stay, for the checker)."""
    return (
        holds_plain_bytes(tensor)
        and tensor.HasField("raw_data")
        and int(np.prod(tensor.dims, dtype=np.int64)) > SKELETON_MAX_ELEMENTS
    )


def raw_data_size(tensor: onnx.TensorProto) -> int | None:
    """Bytes that ``raw_data`` must hold for the tensor's shape and type (None for
    types without a whole-byte item size, which are never left out of a skeleton)."""
    itemsize = _ITEMSIZES.get(tensor.data_type)
    return None if itemsize is None else int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _check_data_size(tensor: onnx.TensorProto) -> None:
    """Raise ``onnx.checker.ValidationError`` unless the ``raw_data`` of ``tensor``
    holds exactly its shape's worth of elements."""
    needed = raw_data_size(tensor)
    held = len(tensor.raw_data)  # a copy of one tensor's bytes at a time
    if held != needed:
        raise onnx.checker.ValidationError(
            f"initializer {tensor.name!r}: raw_data holds {held} bytes, its shape "
            f"{list(tensor.dims)} and type {TensorProto.DataType.Name(tensor.data_type)} need {needed}"
        )


def shape_of(tensor_type: onnx.TypeProto | None) -> tuple | None:
    """Dimensions of a tensor type (None for unknown ones), or None if the rank is unknown."""
    if tensor_type is None or not tensor_type.tensor_type.HasField("shape"):
        return None
    return tuple(
        d.dim_value if d.HasField("dim_value") else None
        for d in tensor_type.tensor_type.shape.dim
    )


def elem_type_of(tensor_type: onnx.TypeProto | None) -> int:
    """Element type of a tensor type, 0 (UNDEFINED) when unknown."""
    return tensor_type.tensor_type.elem_type if tensor_type is not None else 0

