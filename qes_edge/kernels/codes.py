"""Read and write one code of a quant block from the layout tables of ``qes_edge.formats``.

``layout`` is the :class:`Layout` built by :func:`layout_tables`; ``f`` indexes a format in it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from ..formats import QuantFormat

# Columns of the per-format parameter table.
LOW_BITS, HIGH_BITS, SIGNED, BLOCK_SHIFT, BLOCK_BYTES, CODE_LO, CODE_HI = range(7)


class Layout(NamedTuple):
    """The formats' element tables, stacked: row f is format f, column j element j of its block."""

    low_byte: np.ndarray  # int64 [formats, width]: byte of element j's low field, from the block's start
    low_shift: np.ndarray  # int64 [formats, width]: its shift in that byte
    high_byte: np.ndarray  # int64 [formats, width]: the same for the high field (unused without one)
    high_shift: np.ndarray
    params: np.ndarray  # int64 [formats, 7]: the columns LOW_BITS ... CODE_HI


def layout_tables(formats: list[QuantFormat]) -> Layout:
    """Stack the formats' element tables so one kernel serves every quant type."""
    width = max(f.block_elems for f in formats)
    low_byte = np.zeros((len(formats), width), dtype=np.int64)
    low_shift = np.zeros_like(low_byte)
    high_byte = np.zeros_like(low_byte)
    high_shift = np.zeros_like(low_byte)
    params = np.zeros((len(formats), 7), dtype=np.int64)
    for i, f in enumerate(formats):
        n = f.block_elems
        low_byte[i, :n], low_shift[i, :n] = f.low_byte, f.low_shift
        high_byte[i, :n], high_shift[i, :n] = f.high_byte, f.high_shift
        if n & (n - 1):
            raise ValueError(f"{f.name}: block of {n} elements is not a power of two")
        params[i] = (f.low_bits, f.high_bits, int(f.signed), n.bit_length() - 1, f.block_bytes, f.code_lo, f.code_hi)
    return Layout(low_byte, low_shift, high_byte, high_shift, params)


@njit(inline="always")
def code_address(element, f, params, offset):
    """(byte offset of the element's block, index of the element in its block)."""
    shift = params[f, BLOCK_SHIFT]
    block = element >> shift
    return offset + block * params[f, BLOCK_BYTES], element - (block << shift)


@njit(inline="always")
def read_code(buf, base, j, f, layout):
    low_byte, low_shift, high_byte, high_shift, params = layout
    low_bits = params[f, LOW_BITS]
    high_bits = params[f, HIGH_BITS]
    code = (np.int64(buf[base + low_byte[f, j]]) >> low_shift[f, j]) & ((1 << low_bits) - 1)
    if high_bits:
        high = (np.int64(buf[base + high_byte[f, j]]) >> high_shift[f, j]) & ((1 << high_bits) - 1)
        code |= high << low_bits
    if params[f, SIGNED] and code >= (1 << (low_bits + high_bits - 1)):
        code -= 1 << (low_bits + high_bits)
    return code


@njit(inline="always")
def _put_bits(buf, at, shift, bits, value):
    mask = ((1 << bits) - 1) << shift
    old = np.int64(buf[at])
    buf[at] = np.uint8((old & ~mask) | ((value << shift) & mask))


@njit(inline="always")
def write_code(buf, base, j, f, layout, code):
    low_byte, low_shift, high_byte, high_shift, params = layout
    low_bits = params[f, LOW_BITS]
    high_bits = params[f, HIGH_BITS]
    unsigned = code & ((1 << (low_bits + high_bits)) - 1)
    _put_bits(buf, base + low_byte[f, j], low_shift[f, j], low_bits, unsigned)
    if high_bits:
        _put_bits(buf, base + high_byte[f, j], high_shift[f, j], high_bits, unsigned >> low_bits)
