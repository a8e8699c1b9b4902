"""The seeded sparse perturbations of one iteration: a support shared by every pair, signs per pair.

Candidate p of an iteration adds delta_p = s_p * m to the codes, where the
support m is the same for every pair of the iteration and the signs s_p are
the pair's own:

- the support: each code is in it with probability P(delta != 0) of
  delta = stochastic_round(sigma * eps), eps ~ N(0, 1), and has that
  delta's magnitude (1 at any small sigma).  It is drawn as the *gaps*
  between its codes (geometric) and a magnitude for each, from a stream
  keyed by the iteration's support seed (:func:`support_seed`);
- the signs: one fair sign per support code from a stream keyed by the
  pair's seed; the mirrored seed -s flips every sign, giving exactly -delta.

Each candidate's delta is therefore distributed as before (a sparse
stochastic rounding of sigma * eps), but the pairs of an iteration share
their codes: a code's update sums every pair's signed weight instead of
taking one pair's weight alone, so the pairs dither each other and rounding
to whole steps keeps most of the estimated gradient.

Everything here that runs per code is integer arithmetic (splitmix64 and
table look-ups), so the Numba kernels, the C twin and another machine
produce the same positions and signs.  The tables are built once per sigma
in Python with :mod:`decimal`, whose arithmetic is specified to the last
digit (unlike libm's ``erfc``), so two machines given the same sigma build
the same integer tables.

Streams: a tensor is cut into chunks of ``CHUNK`` elements; chunk k of tensor
``key`` has a support stream keyed by (support seed, key, k) and a sign stream
keyed by (|s|, key ^ SIGN_SALT, k).  A delta is therefore a pure function of
(support seed, seed, tensor, element), and chunks can be drawn in parallel.
"""

from __future__ import annotations

import hashlib
from decimal import Decimal, localcontext
from typing import NamedTuple

import numpy as np
from numba import njit

CHUNK = 8192  # elements per stream; part of the determinism contract
GUIDE_BITS = 12  # the gap table is searched from a 4096-entry guide
MAX_GAP_TABLE = 1 << 16
SCHEME = "splitmix64-shared-support-chunk8192-v2"  # recorded in runs; change it when streams change

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
SIGN_SALT = np.uint64(0x5349474E53414C54)  # keeps a seed's sign stream apart from a support stream


def tensor_key(name: str) -> np.uint64:
    """FNV-1a 64 of the tensor name: a stable stream key independent of tensor order."""
    h = 0xCBF29CE484222325
    for byte in name.encode():
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return np.uint64(h)


@njit(inline="always")
def mix64(z):
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def stream_start(seed_abs, key, chunk):
    """Initial splitmix64 state of chunk ``chunk`` of tensor ``key`` under seed ``seed_abs``."""
    z = mix64(np.uint64(seed_abs) + _GOLDEN)
    z = mix64(z ^ np.uint64(key))
    return mix64(z ^ (np.uint64(chunk) + _GOLDEN))


@njit(inline="always")
def next_u64(state):
    """splitmix64: returns (new_state, output)."""
    state = state + _GOLDEN
    return state, mix64(state)


@njit(inline="always")
def draw_gap(state, gap_tail, guide):
    """Number of zero deltas before the next non-zero (geometric), by inverse CDF.

    ``gap_tail[k]`` = P(gap >= k) * 2**64 (decreasing, entry 0 unused); the gap
    is the largest k with u < gap_tail[k].  Past the table's end the gap is
    memoryless: add the table length and draw again.
    """
    last = gap_tail.shape[0] - 1
    gap = np.int64(0)
    while True:
        state, u = next_u64(state)
        if u < gap_tail[last]:
            gap += last
            continue
        k = np.int64(guide[u >> np.uint64(64 - GUIDE_BITS)])
        while k < last and gap_tail[k + 1] > u:
            k += 1
        return state, gap + k


@njit(inline="always")
def draw_magnitude(state, magnitude_tail):
    """|delta| of a support code: 1 plus how many thresholds ``magnitude_tail[1:]`` a fresh u falls below."""
    state, u = next_u64(state)
    magnitude = np.int64(1)
    while magnitude < magnitude_tail.shape[0] and u < magnitude_tail[magnitude]:
        magnitude += 1
    return state, magnitude


def support_seed(seeds: np.ndarray) -> np.int64:
    """The support seed of an iteration: a pure function of its pair seeds (so rows need nothing else)."""
    digest = hashlib.blake2b(np.asarray(seeds, dtype="<i8").tobytes(), digest_size=8, person=b"qes-support").digest()
    return np.int64((int.from_bytes(digest, "little") >> 2) | 1)


@njit(inline="always")
def support_stream(support, key, start):
    """The support stream of chunk ``start // CHUNK`` of tensor ``key``."""
    return stream_start(support, key, start // CHUNK)


@njit(inline="always")
def sign_stream(seed, key, start):
    """The sign stream of ``seed`` in chunk ``start // CHUNK`` of tensor ``key``: (state, sign of ``seed``)."""
    seed_abs = seed if seed > 0 else -seed
    sign = np.int64(1) if seed > 0 else np.int64(-1)
    return stream_start(seed_abs, np.uint64(key) ^ SIGN_SALT, start // CHUNK), sign


@njit(inline="always")
def chunk_streams(support, seed, key, start):
    """The streams of chunk ``start // CHUNK`` of tensor ``key``: (support state, sign state, sign of ``seed``)."""
    sign_state, sign = sign_stream(seed, key, start)
    return support_stream(support, key, start), sign_state, sign


@njit(inline="always")
def next_support(support_state, element, end, gap_tail, guide, magnitude_tail):
    """The next support code at or after ``element`` and its |delta|: (support state, element, magnitude).

    Element >= end ends the chunk.
    """
    support_state, gap = draw_gap(support_state, gap_tail, guide)
    element += gap
    if element >= end:
        return support_state, element, np.int64(0)
    support_state, magnitude = draw_magnitude(support_state, magnitude_tail)
    return support_state, element, magnitude


@njit(inline="always")
def signed_delta(sign_state, sign, magnitude):
    """A seed's delta at its next support code: one fair sign from its stream.  (sign state, delta)."""
    sign_state, u = next_u64(sign_state)
    if u >> np.uint64(63):
        return sign_state, -sign * magnitude
    return sign_state, sign * magnitude


@njit(inline="always")
def next_delta(support_state, sign_state, element, end, gap_tail, guide, magnitude_tail, sign):
    """The next support code at or after ``element`` and this seed's delta there.

    Returns (support state, sign state, element, delta); element >= end ends the chunk.
    """
    support_state, element, magnitude = next_support(support_state, element, end, gap_tail, guide, magnitude_tail)
    if element >= end:
        return support_state, sign_state, element, np.int64(0)
    sign_state, delta = signed_delta(sign_state, sign, magnitude)
    return support_state, sign_state, element, delta


class NoiseTable(NamedTuple):
    """Integer tables for one sigma: the gap distribution and the magnitude distribution.

    A named tuple, so the kernels take it as one argument (Numba types it field by field).
    """

    sigma: float
    density: float  # P(delta != 0) per code
    gap_tail: np.ndarray  # uint64, see draw_gap
    guide: np.ndarray  # int64[2**GUIDE_BITS]: smallest gap in each bucket of u's top bits
    magnitude_tail: np.ndarray  # uint64: magnitude_tail[m] = P(|delta| > m | delta != 0) * 2**64, m >= 1

    @classmethod
    def for_sigma(cls, sigma: float) -> "NoiseTable":
        if not 0 < sigma <= 4:
            raise ValueError(f"sigma must be in (0, 4], got {sigma}")
        probs = _stochastic_round_probabilities(Decimal(repr(float(sigma))))
        nonzero = 2 * sum(probs)
        density_fx = int((nonzero * (1 << 64)).to_integral_value())
        density_fx = max(1, min(density_fx, (1 << 64) - 1))
        keep = (1 << 64) - density_fx  # P(delta == 0) * 2**64
        length = min(MAX_GAP_TABLE, max(64, (1 << 64) * 12 // density_fx))
        tail = [1 << 64]
        for _ in range(length):
            tail.append(tail[-1] * keep >> 64)
        tail[0] = (1 << 64) - 1  # never compared: P(gap >= 0) = 1
        gap_tail = np.array(tail, dtype=np.uint64)
        guide = np.empty(1 << GUIDE_BITS, dtype=np.int64)
        k = length
        for bucket in range(1 << GUIDE_BITS):
            top = ((bucket + 1) << (64 - GUIDE_BITS)) - 1  # largest u in the bucket
            while k > 0 and tail[k] <= top:
                k -= 1
            guide[bucket] = k  # the gap of every u in this bucket is at least k
        # |delta| > m given non-zero, as 2**64 fixed point (compared against a uniform 64-bit u).
        half = nonzero / 2
        magnitude, above = [0], half
        for p in probs:
            above -= p
            value = int((above / half * (1 << 64)).to_integral_value())
            if value <= 0:
                break
            magnitude.append(min(value, (1 << 64) - 1))
        return cls(float(sigma), float(nonzero), gap_tail, guide, np.array(magnitude, dtype=np.uint64))


def _stochastic_round_probabilities(sigma: Decimal) -> list[Decimal]:
    """P(delta = k) for k = 1, 2, ... until negligible, delta = stochastic_round(sigma * eps).

    Stochastic rounding sends x to k with probability tri(x - k), tri(y) = max(0, 1 - |y|),
    and tri(y) = (y+1)+ - 2 y+ + (y-1)+, so P(delta = k) = F(k-1) - 2F(k) + F(k+1)
    with F(a) = E[(sigma*eps - a)+] = sigma*phi(a/sigma) - a*(1 - Phi(a/sigma)).
    """
    with localcontext() as ctx:
        ctx.prec = 50

        def positive_part(a: int) -> Decimal:
            z = Decimal(a) / sigma
            if z > 60:
                return Decimal(0)
            return sigma * _normal_pdf(z) - a * _normal_upper_tail(z)

        probs, k = [], 1
        while True:
            p = positive_part(k - 1) - 2 * positive_part(k) + positive_part(k + 1)
            if p < Decimal(2) ** -70 and k > 1:
                break
            probs.append(p)
            k += 1
        return probs


def _normal_pdf(z: Decimal) -> Decimal:
    return (-(z * z) / 2).exp() / (2 * Decimal(_PI)).sqrt()


def _normal_upper_tail(z: Decimal) -> Decimal:
    """1 - Phi(z) for z >= 0: power series below 3, continued fraction above."""
    if z < 3:
        x = z / Decimal(2).sqrt()
        term, total, n = x, x, 0
        while abs(term) > Decimal(10) ** -45:
            n += 1
            term = -term * x * x / n
            total += term / (2 * n + 1)
        erf = 2 * total / Decimal(_PI).sqrt()
        return (1 - erf) / 2
    # Mills ratio continued fraction: Q(z) = phi(z) / (z + 1/(z + 2/(z + 3/(z + ...)))).
    fraction = z
    for n in range(400, 0, -1):
        fraction = z + n / fraction
    return _normal_pdf(z) / fraction


_PI = "3.14159265358979323846264338327950288419716939937510582097494459"


@njit(cache=True)
def sample_tensor(seed, support, key, n_elements, noise):
    """All non-zero (element, delta) of one tensor: the readable reference for tests and tools."""
    cap = 16
    positions = np.empty(cap, dtype=np.int64)
    deltas = np.empty(cap, dtype=np.int8)
    count = 0
    gap_tail, guide, magnitude_tail = noise.gap_tail, noise.guide, noise.magnitude_tail
    n_chunks = (n_elements + CHUNK - 1) // CHUNK
    for chunk in range(n_chunks):
        element = np.int64(chunk) * CHUNK
        end = min(element + CHUNK, n_elements)
        support_state, sign_state, sign = chunk_streams(support, seed, key, element)
        while True:
            support_state, sign_state, element, delta = next_delta(support_state, sign_state, element, end,
                                                                    gap_tail, guide, magnitude_tail, sign)
            if element >= end:
                break
            if count == cap:
                cap *= 2
                positions = np.concatenate((positions, np.empty(cap - count, dtype=np.int64)))
                deltas = np.concatenate((deltas, np.empty(cap - count, dtype=np.int8)))
            positions[count] = element
            deltas[count] = delta
            count += 1
            element += 1
    return positions[:count], deltas[:count]
