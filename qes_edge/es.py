"""The ES math of one iteration: its seeds, its prompts, and how rewards become integer pair weights.

Every candidate is one of a mirrored pair (+s, -s).  The seeds and the prompts
are pure functions of (run seed, iteration), so any process can score any
candidate; a pair's coefficient comes from its two candidates' per-prompt
rewards (the shaping), and its weight is that coefficient's share of the
step in fixed point, which is all an update needs besides the seeds.
"""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np

from .kernels import to_fixed
from .tasks import Item, Task

MAX_WEIGHT = 1 << 24  # |w| in 2**-15 steps: 512 code steps, far past any sane alpha


def iteration_seeds(seed: int, iteration: int, pairs: int) -> np.ndarray:
    """The positive seeds of one iteration's mirrored pairs: a pure function of (run seed, iteration)."""
    digest = hashlib.sha256(f"qes-edge/{seed}/{iteration}".encode()).digest()
    rng = np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))
    return rng.integers(1, 1 << 62, size=pairs, dtype=np.int64)


def iteration_batch(task: Task, seed: int, iteration: int, size: int) -> list[Item]:
    """The prompts every candidate of one iteration is scored on (common random numbers)."""
    rng = random.Random(f"qes-edge-batch/{seed}/{iteration}")
    if size >= len(task.train):
        return list(task.train)
    return rng.sample(task.train, size)


def mean(rewards: list[float]) -> float:
    return math.fsum(rewards) / len(rewards)


# ---- shaping: per-prompt rewards of each pair's +s and -s candidates -> one coefficient per pair ----

def tscore(plus: list[list[float]], minus: list[list[float]]) -> list[float]:
    """Half each pair's paired t statistic over the batch, clipped to +-3.

    A pair counts as much as its evidence: c = 1 at two standard errors, and a
    difference the batch cannot tell from noise moves little.
    """
    return [_half_t(a, b) for a, b in zip(plus, minus)]


def _half_t(plus: list[float], minus: list[float]) -> float:
    differences = [a - b for a, b in zip(plus, minus)]
    average = mean(differences)
    spread = math.fsum((d - average) ** 2 for d in differences) / (len(differences) - 1)
    if spread == 0:  # every prompt moved the same way, or none moved
        return math.copysign(3.0, average) if average else 0.0
    return max(-3.0, min(3.0, average / math.sqrt(spread / len(differences)) / 2))


def zscore(plus: list[list[float]], minus: list[list[float]]) -> list[float]:
    """The pairs' mean differences over their root mean square, clipped to +-3 (no signal, no step)."""
    differences = [mean(a) - mean(b) for a, b in zip(plus, minus)]
    rms = math.sqrt(math.fsum(d * d for d in differences) / len(differences))
    if rms == 0:
        return [0.0] * len(differences)
    return [max(-3.0, min(3.0, d / rms)) for d in differences]


def rank(plus: list[list[float]], minus: list[list[float]]) -> list[float]:
    """Centred ranks in [-1/2, 1/2] of all candidates' mean rewards; a pair's coefficient is c(+s) - c(-s)."""
    everything = [mean(r) for r in plus] + [mean(r) for r in minus]
    order = sorted(range(len(everything)), key=lambda i: everything[i])
    ranks = [0.0] * len(everything)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and everything[order[j + 1]] == everything[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    centred = [r / (len(everything) - 1) - 0.5 for r in ranks]
    return [centred[p] - centred[p + len(plus)] for p in range(len(plus))]


SHAPINGS = {"tscore": tscore, "zscore": zscore, "rank": rank}  # Settings.shaping names one


def shape_rewards(plus: list[list[float]], minus: list[list[float]], shaping: str) -> list[float]:
    """Per-pair coefficient c(+s) - c(-s) from the candidates' per-prompt rewards."""
    return SHAPINGS[shaping](plus, minus)


def step_size(alpha: float, decay: float, iteration: int) -> float:
    """alpha / sqrt(1 + t / decay): the step shrinks as the run goes on (``decay`` 0: constant).

    Early iterations take the large steps that find the answer's form; later
    ones average more iterations per unit of movement, so the noise in each
    estimate stops walking the codes away from what was learned.
    """
    return alpha / math.sqrt(1 + iteration / decay) if decay else alpha


def pair_weights(coefficients: list[float], alpha: float, sigma: float, population: int) -> np.ndarray:
    """w_p = alpha * c_p / (N sigma) in fixed point: this pair's share of the step, per unit delta."""
    weights = [to_fixed(alpha * c / (population * sigma)) for c in coefficients]
    return np.array([max(-MAX_WEIGHT, min(MAX_WEIGHT, w)) for w in weights], dtype=np.int64)
