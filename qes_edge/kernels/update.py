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

Only codes in an iteration's support have g != 0.  With gamma = 1 a code
outside it keeps its residual and cannot step (|e| < 1/2), so the update
reads and writes the residual of the support's codes alone; with gamma < 1
every stored residual decays, so every code is walked.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange

from .codes import CODE_HI, CODE_LO, code_address, read_code, write_code
from .noise import next_support, sign_stream, signed_delta, support_stream

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


class Update(NamedTuple):
    """One update's inputs: the rows to replay and how the residual carries between them."""

    seeds: np.ndarray  # int64 [rows, pairs], oldest first; the last row is this iteration
    supports: np.ndarray  # int64 [rows]: each row's support seed
    weights: np.ndarray  # int64 [rows, pairs], fixed point
    gamma_fx: np.int64  # the residual's decay, fixed point
    feedback: bool  # False: plain rounding, no residual
    stored_residual: bool  # True: start from the residual argument and write it back; False: from zero


@njit(parallel=True, cache=True)
def es_update(buf, layout, tensors, noise, update, residual):
    """Returns (codes stepped, steps blocked at the range).

    ``residual`` (int16 per code) is read and written only when ``update.stored_residual``.
    """
    chunks = tensors.chunks
    counts = np.zeros((chunks.shape[0], 2), dtype=np.int64)
    for c in prange(chunks.shape[0]):
        counts[c, 0], counts[c, 1] = update_chunk(buf, layout, tensors, chunks[c], noise, update, residual)
    return counts[:, 0].sum(), counts[:, 1].sum()


@njit(inline="always")
def chunk_support(positions, magnitudes, support, key, start, end, gap_tail, guide, magnitude_tail):
    """The chunk's support codes under ``support`` (elements, ascending) and their |delta|; returns how many."""
    state = support_stream(support, key, start)
    element, count = start, 0
    while True:
        state, element, magnitude = next_support(state, element, end, gap_tail, guide, magnitude_tail)
        if element >= end:
            return count
        positions[count] = element
        magnitudes[count] = magnitude
        count += 1
        element += 1


@njit(cache=True)
def row_gradient(gradient, positions, magnitudes, key, start, end, support, seeds_row, weights_row, noise):
    """One iteration's g = sum_p w_p * delta_p on the chunk's support: fills ``positions``, ``magnitudes``
    and ``gradient`` (one entry per support code) and returns how many support codes there are.

    The pairs share the support, so it is drawn once; each pair adds only its signs.
    """
    count = chunk_support(positions, magnitudes, support, key, start, end, noise.gap_tail, noise.guide,
                          noise.magnitude_tail)
    gradient[:count] = 0
    for p in range(seeds_row.shape[0]):
        weight = weights_row[p]
        if weight != 0:
            sign_state, sign = sign_stream(seeds_row[p], key, start)
            for k in range(count):
                sign_state, delta = signed_delta(sign_state, sign, magnitudes[k])
                gradient[k] += weight * delta
    return count


@njit(inline="always")
def feedback_step(u, error, gamma_fx):
    """u + round(gamma * e), then (whole step, new residual)."""
    u += (gamma_fx * error + HALF) >> FRACTION_BITS
    step = (u + HALF) >> FRACTION_BITS
    return step, u - (step << FRACTION_BITS)


@njit(cache=True)
def update_chunk(buf, layout, tensors, chunk, noise, update, residual):
    """One chunk of :func:`es_update`; returns (codes stepped, steps blocked)."""
    params = layout.params
    t, start, end = chunk[0], chunk[1], chunk[2]
    offset, f, code_base = tensors.info[t, 0], tensors.info[t, 1], tensors.info[t, 2]
    lo, hi = params[f, CODE_LO], params[f, CODE_HI]
    n = end - start
    key = tensors.keys[t]
    seeds, weights, supports = update.seeds, update.weights, update.supports
    gamma_fx, feedback, stored = update.gamma_fx, update.feedback, update.stored_residual
    last = seeds.shape[0] - 1
    positions = np.empty(n, dtype=np.int64)
    magnitudes = np.empty(n, dtype=np.int64)
    gradient = np.empty(n, dtype=np.int64)
    count = row_gradient(gradient, positions, magnitudes, key, start, end, supports[last], seeds[last],
                         weights[last], noise)
    if stored and gamma_fx != ONE:
        # Every stored residual decays, so every code is read and written.
        elements = np.arange(start, end)
        g = np.zeros(n, dtype=np.int64)
        g[positions[:count] - start] = gradient[:count]
    else:
        # A code without gradient now keeps its residual (gamma = 1) or has none to keep (replay
        # starts from zero, and with gamma <= 1 and |e| <= 1/2 such a code cannot step).
        nonzero = np.flatnonzero(gradient[:count])
        elements = positions[nonzero]
        g = gradient[nonzero]
    error = np.zeros(elements.size, dtype=np.int64)
    if stored:
        for k in range(elements.size):
            error[k] = residual[code_base + elements[k]]
    elif feedback and last > 0:
        # Replay rebuilds the residual only where this iteration's gradient is non-zero: each past
        # row's sparse gradient is merged into these codes (both lists are in element order).
        past_positions = np.empty(n, dtype=np.int64)
        past_magnitudes = np.empty(n, dtype=np.int64)
        past = np.empty(n, dtype=np.int64)
        for h in range(last):
            past_count = row_gradient(past, past_positions, past_magnitudes, key, start, end, supports[h], seeds[h],
                                      weights[h], noise)
            q = 0
            for k in range(elements.size):
                while q < past_count and past_positions[q] < elements[k]:
                    q += 1
                past_g = past[q] if q < past_count and past_positions[q] == elements[k] else 0
                _, error[k] = feedback_step(past_g, error[k], gamma_fx)
    stepped = blocked = 0
    for k in range(elements.size):
        if feedback:
            step, error[k] = feedback_step(g[k], error[k], gamma_fx)
        else:
            step = (g[k] + HALF) >> FRACTION_BITS
        if step != 0:
            base, j = code_address(elements[k], f, params, offset)
            moved = read_code(buf, base, j, f, layout) + step
            if lo <= moved <= hi:
                write_code(buf, base, j, f, layout, moved)
                stepped += 1
            else:
                blocked += 1
    if stored:
        for k in range(elements.size):
            residual[code_base + elements[k]] = error[k]
    return stepped, blocked
