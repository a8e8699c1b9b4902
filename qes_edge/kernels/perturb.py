"""Gated apply and exact restore of one seeded perturbation (seed, support seed), in place on the live bytes.

Gating: where code + delta would leave the format's range the code is left
alone, and its bit is set in ``gated`` (one bit per trainable code) so that
restore knows not to undo it.  Restore regenerates the same stream and
subtracts; afterwards the bytes are exactly the original ones and ``gated``
is all zero again.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .codes import CODE_HI, CODE_LO, code_address, read_code, write_code
from .noise import chunk_streams, next_delta


@njit(parallel=True, cache=True)
def perturb_codes(buf, layout, tensors, noise, seed, support, gated, restore):
    """Apply (``restore=False``) or undo (``restore=True``) the perturbation of ``seed``; returns codes changed.

    ``support``: the iteration's support seed (:func:`~qes_edge.kernels.noise.support_seed`).

    ``layout``: :class:`~qes_edge.kernels.codes.Layout`; ``tensors``:
    :class:`~qes_edge.kernels.space.TensorTable`; ``noise``: the
    :class:`~qes_edge.kernels.noise.NoiseTable` of sigma.
    """
    chunks = tensors.chunks
    changed = np.zeros(chunks.shape[0], dtype=np.int64)
    for c in prange(chunks.shape[0]):
        changed[c] = perturb_chunk(buf, layout, tensors, chunks[c], noise, seed, support, gated, restore)
    return changed.sum()


@njit(cache=True)
def perturb_chunk(buf, layout, tensors, chunk, noise, seed, support, gated, restore):
    params = layout.params
    t, start, end = chunk[0], chunk[1], chunk[2]
    offset, f, code_base = tensors.info[t, 0], tensors.info[t, 1], tensors.info[t, 2]
    lo, hi = params[f, CODE_LO], params[f, CODE_HI]
    # Draw the chunk's deltas first, then touch memory: independent loads overlap.
    elements = np.empty(end - start, dtype=np.int64)
    deltas = np.empty(end - start, dtype=np.int64)
    count = 0
    gap_tail, guide, magnitude_tail = noise.gap_tail, noise.guide, noise.magnitude_tail
    support_state, sign_state, sign = chunk_streams(support, seed, tensors.keys[t], start)
    element = start
    while True:
        support_state, sign_state, element, delta = next_delta(support_state, sign_state, element, end, gap_tail,
                                                                guide, magnitude_tail, sign)
        if element >= end:
            break
        elements[count] = element
        deltas[count] = delta
        count += 1
        element += 1
    n = 0
    for k in range(count):
        element, delta = elements[k], deltas[k]
        base, j = code_address(element, f, params, offset)
        index = code_base + element
        bit = np.uint8(1 << (index & 7))
        if restore:
            if gated[index >> 3] & bit:
                gated[index >> 3] &= ~bit
            else:
                write_code(buf, base, j, f, layout, read_code(buf, base, j, f, layout) - delta)
                n += 1
        else:
            moved = read_code(buf, base, j, f, layout) + delta
            if lo <= moved <= hi:
                write_code(buf, base, j, f, layout, moved)
                n += 1
            else:
                gated[index >> 3] |= bit
    return n
