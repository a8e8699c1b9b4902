"""Where the integer codes live inside each GGUF quant block.

A code is made of up to two bit fields: a *low* field (a byte or a nibble) and
an optional *high* field (bits stored elsewhere in the block, as in Q5_* and
Q6_K).  Each format describes, for element j of a block, the byte and shift of
both fields; from that one description we build flat tables that every kernel
(Numba and C alike) reads, so adding a format is adding one class.

Layouts follow ``ggml/src/ggml-common.h`` and ``dequantize_row_*`` in
``ggml-quants.c``; ``gguf.quants.dequantize`` is the test oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType as QT


@dataclass(frozen=True)
class QuantFormat:
    """One quant type's code layout.

    ``low_byte[j]``/``low_shift[j]`` locate the low field of element j,
    ``high_byte[j]``/``high_shift[j]`` its high field (unused when
    ``high_bits == 0``).  Codes are read as unsigned ``low | high << low_bits``
    and, for ``signed`` formats (Q8_0), sign-extended from ``low_bits``.
    """

    name: str
    ggml_type: QT
    block_elems: int
    block_bytes: int
    low_bits: int
    high_bits: int
    signed: bool
    low_byte: np.ndarray = field(repr=False)
    low_shift: np.ndarray = field(repr=False)
    high_byte: np.ndarray = field(repr=False)
    high_shift: np.ndarray = field(repr=False)

    @property
    def code_bits(self) -> int:
        return self.low_bits + self.high_bits

    @property
    def code_lo(self) -> int:
        return -(1 << (self.code_bits - 1)) if self.signed else 0

    @property
    def code_hi(self) -> int:
        return (1 << (self.code_bits - 1)) - 1 if self.signed else (1 << self.code_bits) - 1

    # Whole-array access: the readable reference the kernels are tested against.
    def read_codes(self, raw: np.ndarray) -> np.ndarray:
        """All codes of a tensor's raw bytes, as int32 in block order."""
        blocks = np.asarray(raw, dtype=np.uint8).reshape(-1, self.block_bytes).astype(np.int32)
        low = (blocks[:, self.low_byte] >> self.low_shift) & ((1 << self.low_bits) - 1)
        code = low
        if self.high_bits:
            high = (blocks[:, self.high_byte] >> self.high_shift) & ((1 << self.high_bits) - 1)
            code = code | (high << self.low_bits)
        if self.signed:
            code = np.where(code > self.code_hi, code - (1 << self.code_bits), code)
        return code.reshape(-1)

    def write_codes(self, raw: np.ndarray, codes: np.ndarray) -> None:
        """Store ``codes`` (block order) into ``raw`` in place, leaving scales untouched."""
        codes = np.asarray(codes, dtype=np.int64)
        if codes.min(initial=self.code_lo) < self.code_lo or codes.max(initial=self.code_hi) > self.code_hi:
            raise ValueError(f"{self.name}: code out of range [{self.code_lo}, {self.code_hi}]")
        blocks = raw.reshape(-1, self.block_bytes)
        unsigned = (codes & ((1 << self.code_bits) - 1)).reshape(blocks.shape[0], self.block_elems)
        fields = [(self.low_byte, self.low_shift, self.low_bits, unsigned)]
        if self.high_bits:
            fields.append((self.high_byte, self.high_shift, self.high_bits, unsigned >> self.low_bits))
        for byte, shift, bits, value in fields:
            mask = (1 << bits) - 1
            for j in range(self.block_elems):
                column = blocks[:, byte[j]].astype(np.int64)
                column = (column & ~(mask << shift[j])) | ((value[:, j] & mask) << shift[j])
                blocks[:, byte[j]] = column.astype(np.uint8)


FORMATS: dict[QT, QuantFormat] = {}


def _register(name, ggml_type, block_elems, block_bytes, low_bits, high_bits, signed, element):
    """``element(j)`` -> (low_byte, low_shift, high_byte, high_shift) for element j of a block."""
    cols = np.array([element(j) for j in range(block_elems)], dtype=np.int32).reshape(block_elems, 4)
    FORMATS[ggml_type] = QuantFormat(
        name, ggml_type, block_elems, block_bytes, low_bits, high_bits, signed,
        cols[:, 0].copy(), cols[:, 1].copy(), cols[:, 2].copy(), cols[:, 3].copy(),
    )


def _nibble32(qs_offset):
    """Q4_0/Q4_1/Q5_*: element j < 16 is the low nibble of qs[j], j >= 16 the high nibble of qs[j-16]."""
    return lambda j: (qs_offset + j % 16, 4 * (j // 16))


# Q8_0: f16 d, int8 qs[32]
_register("Q8_0", QT.Q8_0, 32, 34, 8, 0, True, lambda j: (2 + j, 0, 0, 0))
# Q4_0: f16 d, qs[16]
_register("Q4_0", QT.Q4_0, 32, 18, 4, 0, False, lambda j: (*_nibble32(2)(j), 0, 0))
# Q4_1: f16 d, f16 m, qs[16]
_register("Q4_1", QT.Q4_1, 32, 20, 4, 0, False, lambda j: (*_nibble32(4)(j), 0, 0))
# Q5_0: f16 d, qh[4] (bit j of a little-endian uint32 is element j's 5th bit), qs[16]
_register("Q5_0", QT.Q5_0, 32, 22, 4, 1, False, lambda j: (*_nibble32(6)(j), 2 + j // 8, j % 8))
# Q5_1: f16 d, f16 m, qh[4], qs[16]
_register("Q5_1", QT.Q5_1, 32, 24, 4, 1, False, lambda j: (*_nibble32(8)(j), 4 + j // 8, j % 8))


def _k_nibble(qs_offset, j):
    """Q4_K/Q5_K: 4 groups of 64; in group g, elements 0..31 are low nibbles of qs[32g+l], 32..63 high."""
    g, r = divmod(j, 64)
    return qs_offset + 32 * g + r % 32, 4 * (r // 32)


# Q4_K: f16 d, f16 dmin, scales[12], qs[128]
_register("Q4_K", QT.Q4_K, 256, 144, 4, 0, False, lambda j: (*_k_nibble(16, j), 0, 0))
# Q5_K: f16 d, f16 dmin, scales[12], qh[32], qs[128]; high bit of element j is bit (2g + r//32) of qh[r%32]
_register(
    "Q5_K", QT.Q5_K, 256, 176, 4, 1, False,
    lambda j: (*_k_nibble(48, j), 16 + j % 64 % 32, 2 * (j // 64) + (j % 64) // 32),
)


def _q6_k(j):
    """Q6_K: ql[128], qh[64], scales[16], f16 d; two halves of 128, each four quarters of 32."""
    h, r = divmod(j, 128)
    k, l = divmod(r, 32)
    return 64 * h + l + 32 * (k & 1), 4 * (k >> 1), 128 + 32 * h + l, 2 * k


_register("Q6_K", QT.Q6_K, 256, 210, 4, 2, False, _q6_k)


def format_of(ggml_type) -> QuantFormat | None:
    """The layout for a GGML type, or None when its codes are not trainable."""
    try:
        return FORMATS.get(QT(int(ggml_type)))
    except ValueError:
        return None
