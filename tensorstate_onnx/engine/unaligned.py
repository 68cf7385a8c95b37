"""Eight bytes of a byte array as one uint64, loaded or stored in one
unaligned access (numba would check each of eight byte indices for being
negative, and a function of its own is not inlined); the key of a packed
row of up to 8 bytes, and packed rows as zero-padded words, read that way."""

from __future__ import annotations

import sys

import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

from .jit import kernel

__all__ = ["load8", "load8_be", "packed_rows", "padded_words", "row_key", "store8"]

_WORD = ir.IntType(64)
_LITTLE_HOST = sys.byteorder == "little"


def _byte_array_at(context, builder, signature, args):
    """LLVM pointer to element ``args[1]`` of the 1-d contiguous array ``args[0]``."""
    array = context.make_array(signature.args[0])(context, builder, args[0])
    at = context.cast(builder, args[1], signature.args[1], types.intp)
    return builder.bitcast(builder.gep(array.data, [at]), _WORD.as_pointer())


def _is_byte_array(buf) -> bool:
    """Whether the numba type ``buf`` is a 1-d contiguous uint8 array."""
    return isinstance(buf, types.Array) and buf.dtype == types.uint8 and buf.ndim == 1 and buf.layout == "C"


def _load_word(returns, buf, index, big_endian: bool):
    """The typing of a load of eight bytes, or None where it does not apply."""
    if not (_is_byte_array(buf) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        word = builder.load(_byte_array_at(context, builder, signature, args), align=1, typ=_WORD)
        return builder.bswap(word) if big_endian == _LITTLE_HOST else word

    return returns(buf, index), codegen


@intrinsic
def load8(typingctx, buf, index):
    """``buf[index:index+8]`` (a contiguous uint8 array) as a little-endian uint64."""
    return _load_word(types.uint64, buf, index, big_endian=False)


@intrinsic
def load8_be(typingctx, buf, index):
    """``buf[index:index+8]`` (a contiguous uint8 array) as a big-endian
    uint64: ``buf[index]`` in the top byte, so that words order as their bytes do."""
    return _load_word(types.uint64, buf, index, big_endian=True)


@intrinsic
def store8(typingctx, buf, index, word):
    """``word`` (uint64) into ``buf[index:index+8]`` (a contiguous uint8
    array), little-endian."""
    if not (_is_byte_array(buf) and isinstance(index, types.Integer) and word == types.uint64):
        return None

    def codegen(context, builder, signature, args):
        value = builder.bswap(args[2]) if not _LITTLE_HOST else args[2]
        builder.store(value, _byte_array_at(context, builder, signature, args), align=1)
        return context.get_dummy_value()

    return types.void(buf, index, word), codegen


_ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)


@kernel(inline="always")
def row_key(flat, row, n_bytes):
    """Row ``row`` of packed rows of ``n_bytes`` (at most 8) bytes, given
    flattened (``flat``), as a big-endian uint64 padded with zeros at the low
    end: keys order as the rows' bytes do. One load where eight bytes lie
    within ``flat``, else byte by byte."""
    at = row * n_bytes
    low = np.uint64(8 * (8 - n_bytes))
    if at + 8 <= flat.size:
        return load8_be(flat, at) & (_ALL_ONES << low)
    key = np.uint64(0)
    for k in range(n_bytes):
        key = (key << np.uint64(8)) | np.uint64(flat[at + k])
    return key << low


@kernel
def padded_words(flat, n_bytes, first, rows, out):
    """Rows ``first..first + rows`` of packed rows of ``n_bytes`` bytes, given
    flattened (``flat``), into ``out``: the bytes of ``rows`` rows of uint64
    words (``out.size // rows`` bytes a row), each row zero padded past its
    ``n_bytes``, eight bytes a load and a store."""
    if rows == 0:
        return
    row_bytes = out.size // rows
    full = n_bytes // 8
    tail = n_bytes - 8 * full
    keep = (np.uint64(1) << np.uint64(8 * tail)) - np.uint64(1)
    zero = np.uint64(0)
    for i in range(rows):
        src = (first + i) * n_bytes
        dst = row_bytes * i
        for w in range(full):
            store8(out, dst + 8 * w, load8(flat, src + 8 * w))
        done = 8 * full
        if tail:
            at = src + done
            if at + 8 <= flat.size:
                word = load8(flat, at) & keep
            else:
                word = zero
                for k in range(tail):
                    word |= np.uint64(flat[at + k]) << np.uint64(8 * k)
            store8(out, dst + done, word)
            done += 8
        for b in range(done, row_bytes, 8):
            store8(out, dst + b, zero)


@kernel
def packed_rows(flat, row_bytes, n_bytes, out):
    """The inverse of :func:`padded_words`: the first ``n_bytes`` bytes of each
    row of ``row_bytes`` bytes of ``flat``, one after the other into ``out``
    (``out.size // n_bytes`` rows), eight bytes a load and a store. A row's
    last word is stored whole where the next row will write over its spill."""
    full = n_bytes // 8
    tail = n_bytes - 8 * full
    for i in range(out.size // n_bytes):
        src = i * row_bytes
        dst = i * n_bytes
        for w in range(full):
            store8(out, dst + 8 * w, load8(flat, src + 8 * w))
        if tail:
            at = dst + 8 * full
            word = load8(flat, src + 8 * full)
            if at + 8 <= out.size:
                store8(out, at, word)
            else:
                for k in range(tail):
                    out[at + k] = np.uint8(word >> np.uint64(8 * k))
