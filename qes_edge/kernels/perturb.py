"""Gated apply, exact restore, and swap of seeded perturbations (seed, support seed), in place on the live bytes.

Gating: where code + delta would leave the format's range the code is left
alone, and its bit is set in ``gated`` (one bit per trainable code) so that
restore knows not to undo it.  Restore regenerates the same stream and
subtracts; afterwards the bytes are exactly the original ones and ``gated``
is all zero again.

One kernel does all three: it takes the perturbation of seed ``undo`` off
and puts that of seed ``apply`` on (0: none), so a replica going from one
candidate of an iteration to the next walks their shared support once.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .codes import CODE_HI, CODE_LO, code_address, read_code, write_code
from .noise import next_support, sign_stream, signed_delta, support_stream


@njit(parallel=True, cache=True)
def perturb_codes(buf, layout, tensors, noise, undo, apply, support, gated):
    """Take the perturbation of seed ``undo`` off the codes and put that of seed ``apply`` on, in one walk.

    ``undo``/``apply``: signed seeds, 0 for none (apply only: perturb; undo
    only: restore).  Both are of ``support``, the iteration's support seed
    (:func:`~qes_edge.kernels.noise.support_seed`), and ``undo`` must be the
    perturbation on the codes.  Returns the codes ``apply`` changed, or with
    no ``apply``, the codes restored.

    ``layout``: :class:`~qes_edge.kernels.codes.Layout`; ``tensors``:
    :class:`~qes_edge.kernels.space.TensorTable`; ``noise``: the
    :class:`~qes_edge.kernels.noise.NoiseTable` of sigma.
    """
    chunks = tensors.chunks
    changed = np.zeros(chunks.shape[0], dtype=np.int64)
    for c in prange(chunks.shape[0]):
        changed[c] = perturb_chunk(buf, layout, tensors, chunks[c], noise, undo, apply, support, gated)
    return changed.sum()


@njit(cache=True)
def perturb_chunk(buf, layout, tensors, chunk, noise, undo, apply, support, gated):
    params = layout.params
    t, start, end = chunk[0], chunk[1], chunk[2]
    offset, f, code_base = tensors.info[t, 0], tensors.info[t, 1], tensors.info[t, 2]
    lo, hi = params[f, CODE_LO], params[f, CODE_HI]
    key = tensors.keys[t]
    # Draw the chunk's deltas first, then touch memory: independent loads overlap.
    elements = np.empty(end - start, dtype=np.int64)
    taken = np.empty(end - start, dtype=np.int64)
    given = np.empty(end - start, dtype=np.int64)
    count = 0
    gap_tail, guide, magnitude_tail = noise.gap_tail, noise.guide, noise.magnitude_tail
    support_state = support_stream(support, key, start)
    undo_state, undo_sign = sign_stream(undo, key, start)
    apply_state, apply_sign = sign_stream(apply, key, start)
    element = start
    while True:
        support_state, element, magnitude = next_support(support_state, element, end, gap_tail, guide,
                                                         magnitude_tail)
        if element >= end:
            break
        off = on = np.int64(0)
        if undo != 0:
            undo_state, off = signed_delta(undo_state, undo_sign, magnitude)
        if apply != 0:
            apply_state, on = signed_delta(apply_state, apply_sign, magnitude)
        elements[count], taken[count], given[count] = element, off, on
        count += 1
        element += 1
    restored = applied = 0
    for k in range(count):
        base, j = code_address(elements[k], f, params, offset)
        index = code_base + elements[k]
        bit = np.uint8(1 << (index & 7))
        code = read_code(buf, base, j, f, layout)
        moved = code
        if undo != 0:
            if gated[index >> 3] & bit:
                gated[index >> 3] &= ~bit
            else:
                moved -= taken[k]
                restored += 1
        if apply != 0:
            if lo <= moved + given[k] <= hi:
                moved += given[k]
                applied += 1
            else:
                gated[index >> 3] |= bit
        if moved != code:
            write_code(buf, base, j, f, layout, moved)
    return applied if apply != 0 else restored
