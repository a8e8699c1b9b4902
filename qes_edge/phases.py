"""Seconds spent in each phase of training, summed over the process: what scripts/bench_iteration.py reads.

The library marks its phases where they happen (``@timed(PERTURB)`` on a
method, or ``with timed(UPDATE):``); a benchmark calls :func:`reset`, trains,
and reads :func:`seconds` and :func:`calls`.  :func:`cpu_seconds` is the
process's CPU time (every thread) while a phase ran: exact for a phase that
runs alone (held-out evaluation, which scripts/vs_llama_finetune.py leaves out
of training's CPU-minutes), an over-count for phases entered on several
threads at once (replicas' inference).  Marking costs two pairs of clock
reads per phase entered, so it stays on.  ``listeners`` are called with a
phase's name each time one ends (the memory benchmark samples PSS after
every candidate's inference).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from typing import Callable

INFERENCE = "inference"  # scoring candidates: generation or reply likelihoods (Scorer.rewards)
HELDOUT = "held-out evaluation"  # a population's held-out evaluation
PERTURB = "perturb"  # a walk of a candidate's support: perturb, restore or swap
UPDATE = "update"  # the error-feedback update of the residual store and the codes
FOLLOW = "follow"  # a mirror taking the working copy's updated bytes
CHECKPOINT = "checkpoint"  # state.json written
METRICS = "metrics"  # a metrics.jsonl line written
SYNC = "sync"  # the working copy and residual put on disk
PHASES = (INFERENCE, HELDOUT, PERTURB, UPDATE, FOLLOW, CHECKPOINT, METRICS, SYNC)

_seconds: Counter = Counter()
_calls: Counter = Counter()
_cpu: Counter = Counter()
_lock = threading.Lock()  # replicas score on threads of their own
listeners: list[Callable[[str], None]] = []


@contextlib.contextmanager
def timed(phase: str):
    """Count the time inside as ``phase`` (a context manager, or a decorator)."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}")
    start, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        elapsed, used = time.perf_counter() - start, time.process_time() - cpu
        with _lock:
            _seconds[phase] += elapsed
            _cpu[phase] += used
            _calls[phase] += 1
        for listener in listeners:
            listener(phase)


def reset() -> None:
    with _lock:
        _seconds.clear()
        _calls.clear()
        _cpu.clear()


def seconds() -> dict[str, float]:
    """Seconds per phase since :func:`reset`, every phase listed (0 for one never entered)."""
    return {phase: _seconds[phase] for phase in PHASES}


def cpu_seconds() -> dict[str, float]:
    """CPU seconds of the whole process while each phase ran, since :func:`reset`."""
    return {phase: _cpu[phase] for phase in PHASES}


def calls() -> dict[str, int]:
    return {phase: _calls[phase] for phase in PHASES}
