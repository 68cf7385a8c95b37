"""Reading a model file without its weights: they stay in the file until onnxruntime reads them.

A probed session needs the graph in memory, but the weights only once, in
onnxruntime's own buffers. :func:`load_model_deferred` walks the file's protobuf
encoding (memory-mapped, so the weights' pages are never read), builds the
model without the data of its large initializers, and turns each of them into
an external-data reference into the ``.onnx`` file itself (its offset and
length there): the ONNX form of "these bytes live in that file". onnxruntime
then reads each weight once from the file (``session.model_external_initializers_file_folder_path``,
onnxruntime >= 1.21) and :func:`with_weights` reads them back into a ModelProto
when a whole model is asked for.

Only the plain layout exporters write is walked (one graph field, each
initializer's ``raw_data`` at most once); anything else is read the ordinary
way, so a damaged or unusual file gets the same errors as :func:`~.io.load_model`.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import onnx
from onnx import TensorProto

from google.protobuf.message import DecodeError

from .io import (
    SKELETON_MAX_ELEMENTS, check_external_data, check_model, holds_plain_bytes, load_model, raw_data_size,
)

__all__ = ["has_deferred_weights", "load_model_deferred", "with_weights"]

# Field numbers of onnx.proto3 (ModelProto.graph, GraphProto.initializer, TensorProto.raw_data).
_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5

#: ``raw_data`` longer than this stays in the file: it holds more than
#: SKELETON_MAX_ELEMENTS elements whatever its type, so every tensor whose values
#: the rewriter reads (shapes, axes, small constants) stays in memory.
DEFER_MIN_BYTES = SKELETON_MAX_ELEMENTS * 8


class _Unusual(Exception):
    """The file is not in the layout this module walks; read it the ordinary way."""


def load_model_deferred(path: str | os.PathLike) -> onnx.ModelProto:
    """The checked model at ``path``, its large weights left in the file as external data.

    Costs the graph's structure, not its weights. The result's external-data
    locations are relative to ``path``'s folder (pass that folder to
    :func:`with_weights` or onnxruntime). A file this module does not walk (a
    symbolic link, an unusual encoding, a damaged file) is loaded whole by
    :func:`~.io.load_model`, which also raises its errors.
    """
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return load_model(path)
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            encoded, deferred = _without_large_raw_data(data)
        model = onnx.ModelProto.FromString(encoded)
        _refer_to_file(model, deferred, path.name)
    except (_Unusual, DecodeError, ValueError, OSError):
        return load_model(path)
    if not model.HasField("graph"):
        return load_model(path)
    check_external_data(model, path.parent)
    try:
        check_model(model)
    except (onnx.checker.ValidationError, ValueError, RuntimeError):
        return load_model(path)  # raises the checker's error with load_model's message
    return model


def has_deferred_weights(model: onnx.ModelProto) -> bool:
    """Whether any initializer of the main graph keeps its data in a file."""
    return any(tensor.data_location == TensorProto.EXTERNAL for tensor in model.graph.initializer)


def with_weights(model: onnx.ModelProto, folder: str | os.PathLike) -> onnx.ModelProto:
    """A copy of ``model`` with the external data of its tensors read from ``folder``."""
    full = onnx.ModelProto()
    full.CopyFrom(model)
    onnx.load_external_data_for_model(full, os.fspath(folder))
    for tensor in full.graph.initializer:
        if tensor.data_location == TensorProto.DEFAULT:
            tensor.ClearField("data_location")  # as a file without external data has it
    return full


def _refer_to_file(model: onnx.ModelProto, deferred: list[tuple[int, int, int]], location: str) -> None:
    """Make each deferred initializer an external-data reference to ``location``."""
    initializers = model.graph.initializer
    for index, offset, length in deferred:
        tensor = initializers[index]
        plain = holds_plain_bytes(tensor) and not tensor.external_data and not tensor.HasField("segment")
        if not plain or raw_data_size(tensor) != length:
            raise _Unusual(tensor.name)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value


def _without_large_raw_data(data) -> tuple[bytes, list[tuple[int, int, int]]]:
    """The model's encoding without the large ``raw_data`` of its initializers, and
    (initializer index, offset, length) of each one left out."""
    out = bytearray()
    deferred: list[tuple[int, int, int]] = []
    graphs = 0
    for number, wire, start, payload, end in _fields(data, 0, len(data)):
        if number != _MODEL_GRAPH:
            out += data[start:end]
            continue
        if wire != _LENGTH_DELIMITED or (graphs := graphs + 1) > 1:
            raise _Unusual("graph")
        graph = bytearray()
        index = 0
        for g_number, g_wire, g_start, g_payload, g_end in _fields(data, payload, end):
            if g_number != _GRAPH_INITIALIZER:
                graph += data[g_start:g_end]
                continue
            if g_wire != _LENGTH_DELIMITED:
                raise _Unusual("initializer")
            tensor, raw = _tensor_without_raw_data(data, g_payload, g_end)
            graph += _key(_GRAPH_INITIALIZER) + _varint(len(tensor)) + tensor
            if raw is not None:
                deferred.append((index, *raw))
            index += 1
        out += _key(_MODEL_GRAPH) + _varint(len(graph)) + graph
    return bytes(out), deferred


def _tensor_without_raw_data(data, start: int, end: int) -> tuple[bytes, tuple[int, int] | None]:
    """One TensorProto's encoding, without its ``raw_data`` when that is large."""
    fields = list(_fields(data, start, end))
    raws = [field for field in fields if field[0] == _TENSOR_RAW_DATA]
    if len(raws) > 1 or any(field[1] != _LENGTH_DELIMITED for field in raws):
        raise _Unusual("raw_data")
    if not raws or raws[0][4] - raws[0][3] <= DEFER_MIN_BYTES:
        return bytes(data[start:end]), None
    _, _, _, payload, raw_end = raws[0]
    kept = b"".join(data[f_start:f_end] for number, _, f_start, _, f_end in fields if number != _TENSOR_RAW_DATA)
    return kept, (payload, raw_end - payload)


def _fields(data, start: int, end: int):
    """(number, wire type, key start, payload start, end) of each field in ``data[start:end]``."""
    position = start
    while position < end:
        key_start = position
        key, position = _read_varint(data, position, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, position = _read_varint(data, position, end)
            payload = position
        elif wire in (_FIXED64, _FIXED32):
            payload, position = position, position + (8 if wire == _FIXED64 else 4)
        elif wire == _LENGTH_DELIMITED:
            length, payload = _read_varint(data, position, end)
            position = payload + length
        else:
            raise _Unusual(f"wire type {wire}")
        if number == 0 or position > end:
            raise _Unusual("truncated")
        yield number, wire, key_start, payload, position


def _read_varint(data, position: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if position >= end or shift > 63:
            raise _Unusual("varint")
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int) -> bytes:
    return _varint(number << 3 | _LENGTH_DELIMITED)
