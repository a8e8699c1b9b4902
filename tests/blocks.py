"""Valid random quant blocks of every trainable format, and code spaces made of them.

Legacy formats are quantized from random floats with ``gguf.quants``; K-quant
blocks (which gguf-py cannot quantize) are built byte by byte with small,
finite f16 scales and random codes, and checked against ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import quants

from qes_edge.formats import FORMATS
from qes_edge.kernels import CodeSpace, TensorSlot

LEGACY = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]
K_QUANTS = [QT.Q4_K, QT.Q5_K, QT.Q6_K]
ALL = LEGACY + K_QUANTS


def f16_bytes(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, dtype=np.float16).view(np.uint8).reshape(-1, 2)


def random_blocks(qtype: QT, n_blocks: int, rng: np.random.Generator) -> np.ndarray:
    """``n_blocks`` valid blocks of ``qtype`` as a flat uint8 array."""
    fmt = FORMATS[qtype]
    if qtype in LEGACY:
        weights = rng.standard_normal((n_blocks, fmt.block_elems)).astype(np.float32)
        return quants.quantize(weights, qtype).reshape(-1).copy()
    raw = rng.integers(0, 256, size=(n_blocks, fmt.block_bytes), dtype=np.uint8)
    d = f16_bytes(rng.uniform(0.01, 0.1, n_blocks))
    if qtype == QT.Q6_K:
        raw[:, 208:210] = d  # ql[128], qh[64], int8 scales[16], d
    else:
        raw[:, 0:2] = d  # d, dmin, scales[12], ...
        raw[:, 2:4] = f16_bytes(rng.uniform(0.0, 0.05, n_blocks))
    return raw.reshape(-1)


def step_size(qtype: QT, block: np.ndarray, j: int) -> float:
    """How much one code step changes the weight of element j, from the block's scales.

    Legacy formats: d.  Q4_K and Q5_K: d times the 6-bit scale of the element's
    sub-block of 32.  Q6_K: d times the int8 scale of its sub-block of 16.
    """
    d = float(block[0:2].view(np.float16)[0]) if qtype != QT.Q6_K else float(block[208:210].view(np.float16)[0])
    if qtype in LEGACY:
        return d
    if qtype == QT.Q6_K:
        return d * float(block[192 + j // 16].view(np.int8))
    scales = block[4:16]
    sub = j // 32
    if sub < 4:
        sc = scales[sub] & 63
    else:
        sc = (scales[sub + 4] & 0xF) | ((scales[sub - 4] >> 6) << 4)
    return d * float(sc)


def dequantize(qtype: QT, raw: np.ndarray) -> np.ndarray:
    fmt = FORMATS[qtype]
    return quants.dequantize(raw.reshape(-1, fmt.block_bytes), qtype).reshape(-1).astype(np.float64)


def make_space(qtypes, sigma, seed=0, edge_fraction=0.3):
    """A buffer holding one tensor per quant type, with many codes pushed to the range's edges."""
    rng = np.random.default_rng(seed)
    parts, slots, offset = [], [], 16  # a non-zero start, like tensor data inside a GGUF
    for i, qtype in enumerate(qtypes):
        fmt = FORMATS[qtype]
        n_blocks = 10240 // fmt.block_elems  # 10240 elements: more than one 8192-element chunk
        raw = random_blocks(qtype, n_blocks, rng)
        codes = fmt.read_codes(raw)
        edge = rng.random(codes.size) < edge_fraction
        codes[edge] = np.where(rng.random(edge.sum()) < 0.5, fmt.code_lo, fmt.code_hi)
        fmt.write_codes(raw, codes)
        parts.append(raw)
        slots.append(TensorSlot(f"blk.{i}.{fmt.name}", int(qtype), offset, codes.size))
        offset += raw.size
    buf = np.concatenate([np.zeros(16, np.uint8)] + parts)
    return CodeSpace(buf, slots, sigma)
