"""The error-feedback update, in fixed point so every machine and kernel set agrees.

Per code, with S = ``FRACTION_BITS`` and all quantities in units of 2**-S code steps:

    g    = sum_p w_p * delta_p           # w_p = round(alpha * (F(+s_p) - F(-s_p)) / (N sigma) * 2**S)
    u    = g + round(gamma * e)          # error feedback (u = g without it)
    step = floor(u / 2**S + 1/2)         # round to the nearest whole code step
    e    = u - step * 2**S               # the part rounding lost, |e| <= 1/2 step
    code += step  unless that leaves the range (the step is dropped: anti-windup)

The residual is the rounding remainder of the *intended* step, so it never
depends on the codes: a blocked step at the range's edge is dropped rather
than accumulated (no wind-up), and the residual can be rebuilt exactly from
(seeds, weights) alone — which is what makes seed replay exact when its
window covers the run.

``seeds[h]``/``weights[h]`` are the rows of the iterations to replay, oldest
first; only the last row moves codes.  The sidecar store passes one row and
its stored residual; the replay store passes its window and starts from zero.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .codes import BLOCK_BYTES, BLOCK_ELEMS, CODE_HI, CODE_LO, read_code, write_code
from .noise import CHUNK, draw_delta, draw_gap, stream_start

FRACTION_BITS = 15
ONE = 1 << FRACTION_BITS
HALF = ONE >> 1


def to_fixed(x: float) -> int:
    """Round a real to fixed point (half away from zero), identically on every machine."""
    scaled = abs(x) * ONE
    whole = int(scaled)
    if scaled - whole >= 0.5:
        whole += 1
    return whole if x >= 0 else -whole


@njit(parallel=True, cache=True)
def es_update(buf, layout, tensor_keys, tensor_info, chunks, seeds, weights, gamma_fx, feedback,
              residual, stored_residual, gap_tail, guide, magnitude_tail):
    """Returns (codes stepped, steps blocked at the range)."""
    counts = np.zeros((chunks.shape[0], 2), dtype=np.int64)
    for c in prange(chunks.shape[0]):
        update_chunk(buf, layout, tensor_keys, tensor_info, chunks[c], seeds, weights, gamma_fx, feedback,
                     residual, stored_residual, gap_tail, guide, magnitude_tail, counts[c])
    return counts[:, 0].sum(), counts[:, 1].sum()


@njit(cache=True)
def chunk_gradient(gradient, key, start, end, seeds_row, weights_row, gap_tail, guide, magnitude_tail):
    """gradient[i] = sum_p w_p * delta_p[start + i] over this chunk's streams."""
    gradient[:] = 0
    for p in range(seeds_row.shape[0]):
        seed = seeds_row[p]
        weight = weights_row[p]
        if weight == 0:
            continue
        seed_abs = seed if seed > 0 else -seed
        sign = np.int64(1) if seed > 0 else np.int64(-1)
        state = stream_start(seed_abs, key, start // CHUNK)
        element = start
        while True:
            state, gap = draw_gap(state, gap_tail, guide)
            element += gap
            if element >= end:
                break
            state, delta = draw_delta(state, magnitude_tail, sign)
            gradient[element - start] += weight * delta
            element += 1


@njit(cache=True)
def update_chunk(buf, layout, tensor_keys, tensor_info, chunk, seeds, weights, gamma_fx, feedback,
                 residual, stored_residual, gap_tail, guide, magnitude_tail, counts):
    params = layout[4]
    t, start, end = chunk[0], chunk[1], chunk[2]
    offset, f, code_base = tensor_info[t, 0], tensor_info[t, 1], tensor_info[t, 2]
    block_elems, block_bytes = params[f, BLOCK_ELEMS], params[f, BLOCK_BYTES]
    lo, hi = params[f, CODE_LO], params[f, CODE_HI]
    n = end - start
    error = np.zeros(n, dtype=np.int64)
    if stored_residual:
        for i in range(n):
            error[i] = residual[code_base + start + i]
    gradient = np.empty(n, dtype=np.int64)
    rows = seeds.shape[0]
    for h in range(rows):
        chunk_gradient(gradient, tensor_keys[t], start, end, seeds[h], weights[h], gap_tail, guide,
                       magnitude_tail)
        moves = h == rows - 1
        for i in range(n):
            u = gradient[i]
            if feedback:
                u += (gamma_fx * error[i] + HALF) >> FRACTION_BITS
            step = (u + HALF) >> FRACTION_BITS
            if feedback:
                error[i] = u - (step << FRACTION_BITS)
            if moves and step != 0:
                element = start + i
                block = element // block_elems
                j = element - block * block_elems
                base = offset + block * block_bytes
                moved = read_code(buf, base, j, f, layout) + step
                if lo <= moved <= hi:
                    write_code(buf, base, j, f, layout, moved)
                    counts[0] += 1
                else:
                    counts[1] += 1
    if stored_residual:
        for i in range(n):
            residual[code_base + start + i] = error[i]
