"""The ES loop: perturb, score, restore, shape, update, checkpoint, one iteration at a time.

:func:`train` runs a :class:`~qes_edge.run.Run` (the checkpoint on disk) with
a population that scores the candidates and applies the updates: a
:class:`~qes_edge.replica.LocalPopulation` in this process, or a
:class:`~qes_edge.fleet.Fleet` of Ray workers.  An iteration is a pure
function of the checkpoint, (run seed, iteration) and the rewards, so a run
stopped or killed anywhere continues to the bytes of one that was not.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import QesError
from .es import iteration_seeds, mean, pair_weights, shape_rewards, step_size
from .metrics import HeldOut, MetricsLine, Sample, Step
from .population import Population
from .run import Run


@dataclass
class Progress:
    """After each iteration (``candidates`` 0, ``judged`` None), after each candidate within one, and after
    each group of items a held-out evaluation judges."""

    iteration: int  # completed iterations
    iterations: int
    reward: float | None  # the iteration's mean reward; None within an iteration
    heldout: HeldOut | None
    seconds: float
    bytes_sent: int | None = None  # with --ray: what crossed the network this iteration
    candidates: int = 0  # candidates scored so far in the iteration under way
    population: int = 0
    judged: tuple[int, int] | None = None  # (items judged, held-out items) while a held-out evaluation runs


@dataclass
class Trained:
    """How a call of :func:`train` ended."""

    completed: bool  # every iteration asked for is done
    iteration: int
    seconds: float
    metrics: Path


def train(run: Run, population: Population, on_progress: Callable[[Progress], None] = lambda p: None,
          on_heldout: Callable[[int, HeldOut], None] = lambda t, h: None) -> Trained:
    """Run the remaining iterations of ``run``, its candidates scored by ``population``.

    Ctrl-C once: finish the candidate, restore, keep what is scored, stop; twice: stop now.  Every
    candidate's rewards are kept as it is scored (scored.json), so a run stopped or killed within an
    iteration loses at most the candidates in flight.
    """
    s = run.settings
    pairs = s.population // 2
    stop = StopFlag()
    started = time.perf_counter()
    keeping = threading.Lock()

    def on_judged(done: int, total: int) -> None:
        on_progress(Progress(run.iteration, s.iterations, None, None, time.perf_counter() - started,
                             judged=(done, total)))
    with run.lock(), population:
        run.truncate_metrics()
        if run.iteration == 0 and run.heldout(0) is None:
            heldout = population.heldout(on_judged)
            run.append_metrics(MetricsLine(0, heldout=heldout))
            on_heldout(0, heldout)
        with stop.installed():
            while run.iteration < s.iterations and not stop.requested:
                # score the iteration's mirrored candidates
                t, t0 = run.iteration, time.perf_counter()
                seeds = iteration_seeds(s.seed, t, pairs)
                scored = run.scored()

                def on_scored(candidate: tuple, rewards: list) -> None:
                    with keeping:
                        scored[candidate] = rewards
                        run.keep_scored(scored)
                        on_progress(Progress(t, s.iterations, None, None, time.perf_counter() - started,
                                             candidates=len(scored), population=s.population))

                rewards = population.score(seeds, t, stop, dict(scored), on_scored)
                if rewards is None:  # stopped between candidates, each one restored
                    break
                if t == 0 and not s.force:
                    require_signal(run.heldout(0), rewards)
                # shape their rewards into pair weights, and update
                t1 = time.perf_counter()
                plus = [rewards[p, 1] for p in range(pairs)]  # per-prompt rewards of each +s candidate
                minus = [rewards[p, -1] for p in range(pairs)]
                weights = pair_weights(shape_rewards(plus, minus, s.shaping), step_size(s.alpha, s.alpha_decay, t),
                                       s.sigma, s.population)
                run.history.append((seeds, weights))
                with population.updated(run.history) as (stepped, blocked):
                    t2 = time.perf_counter()
                    plus, minus = [mean(r) for r in plus], [mean(r) for r in minus]  # logged per candidate
                    step = Step(float(np.mean(plus + minus)), float(np.max(plus + minus)), plus, minus,
                                weights.tolist(), stepped, blocked, round(t1 - t0, 3), round(t2 - t1, 3))
                    # checkpoint: the metrics line, then state.json
                    run.iteration = t + 1
                    heldout = None
                    if run.iteration % s.eval_every == 0 or run.iteration == s.iterations:
                        heldout = population.heldout(on_judged)
                        on_heldout(run.iteration, heldout)
                    report = population.report()
                    run.checkpoint(MetricsLine(run.iteration, step, heldout, report,
                                               round(time.perf_counter() - t0, 3)))
                on_progress(Progress(run.iteration, s.iterations, step.reward_mean, heldout,
                                     time.perf_counter() - started, report.bytes_sent if report else None))
    return Trained(run.iteration >= s.iterations, run.iteration, time.perf_counter() - started, run.files.metrics)


class NoSignal(QesError):
    """The run's first rewards are all the same: ES has nothing to follow.  ``samples``: held-out rows that show why."""

    def __init__(self, message: str, samples: list[Sample]):
        super().__init__(message)
        self.samples = samples


def require_signal(start: HeldOut | None, rewards: dict) -> None:
    """NoSignal when the held-out rewards at iteration 0 and every candidate's rewards on the first batch
    are one and the same value (an empty completion scoring 0 everywhere, say)."""
    if start is None or start.rewards is None:  # a run begun before held-out results kept their rewards
        return
    candidates = [r for per_prompt in rewards.values() for r in per_prompt]
    values = set(start.rewards) | set(candidates)
    if len(values) == 1:
        raise NoSignal(f"no reward signal: all {len(start.rewards)} held-out rewards and all {len(candidates)} "
                       f"candidate rewards of iteration 1 are {values.pop():.3f}, so training cannot learn "
                       "(samples above); check --prompt-format, --reward and --max-tokens, or pass --force",
                       start.samples or [])


class StopFlag:
    """First Ctrl-C: ``requested`` becomes True.  Second: KeyboardInterrupt, as usual."""

    requested = False

    @contextlib.contextmanager
    def installed(self):
        try:
            previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C interrupts at once, as usual
            previous = None
        try:
            yield self
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

