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
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import QesError
from .es import iteration_seeds, mean, pair_weights, shape_rewards, step_size
from .run import Run


@dataclass
class Progress:
    iteration: int
    iterations: int
    reward: float
    heldout: tuple[float, float] | None
    seconds: float
    bytes_sent: int | None = None  # with --ray: what crossed the network this iteration


def train(run: Run, population, on_progress: Callable[[Progress], None] = lambda p: None,
          on_heldout: Callable[[int, dict], None] = lambda t, m: None) -> dict:
    """Run the remaining iterations of ``run``, its candidates scored by ``population``.

    Ctrl-C once: finish the candidate, restore, checkpoint, stop; twice: stop now.
    """
    s = run.settings
    pairs = s.population // 2
    stop = StopFlag()
    started = time.perf_counter()
    with run.lock():
        run.truncate_metrics()
        with population:
            if run.iteration == 0 and run.heldout(0) is None:
                result = population.heldout()
                run.append_metrics({"iteration": 0, "heldout": result})
                on_heldout(0, result)
            with stop.installed():
                while run.iteration < s.iterations and not stop.requested:
                    t, t0 = run.iteration, time.perf_counter()
                    seeds = iteration_seeds(s.seed, t, pairs)
                    with population.dirty():
                        rewards = population.score(seeds, t, stop)
                    if rewards is None:  # stopped between candidates, each one restored
                        break
                    if t == 0 and not s.force:
                        require_signal(run.heldout(0), rewards)
                    with population.dirty():
                        t1 = time.perf_counter()
                        plus = [rewards[p, 1] for p in range(pairs)]  # per-prompt rewards of each +s candidate
                        minus = [rewards[p, -1] for p in range(pairs)]
                        weights = pair_weights(shape_rewards(plus, minus, s.shaping),
                                               step_size(s.alpha, s.alpha_decay, t), s.sigma, s.population)
                        run.history.append((seeds, weights))
                        stepped, blocked = population.apply(run.history)
                        t2 = time.perf_counter()
                        plus, minus = [mean(r) for r in plus], [mean(r) for r in minus]  # logged per candidate
                        line = {
                            "iteration": t + 1,
                            "reward_mean": float(np.mean(plus + minus)),
                            "reward_max": float(np.max(plus + minus)),
                            "rewards_plus": plus,
                            "rewards_minus": minus,
                            "weights": weights.tolist(),
                            "codes_stepped": stepped,
                            "steps_blocked": blocked,
                            "score_s": round(t1 - t0, 3),
                            "update_s": round(t2 - t1, 3),
                        }
                        run.iteration = t + 1
                        if run.iteration % s.eval_every == 0 or run.iteration == s.iterations:
                            line["heldout"] = population.heldout()
                            on_heldout(run.iteration, line["heldout"])
                        line.update(population.report())
                        line["iteration_s"] = round(time.perf_counter() - t0, 3)
                        run.checkpoint(line)
                    on_progress(Progress(run.iteration, s.iterations, line["reward_mean"],
                                         _accuracy(line.get("heldout")), time.perf_counter() - started,
                                         line.get("bytes_sent")))
    return {"completed": run.iteration >= s.iterations, "iteration": run.iteration,
            "seconds": time.perf_counter() - started, "metrics": run.files.metrics}


class NoSignal(QesError):
    """The run's first rewards are all the same: ES has nothing to follow.  ``samples``: held-out rows that show why."""

    def __init__(self, message: str, samples: list[dict]):
        super().__init__(message)
        self.samples = samples


def require_signal(start: dict | None, rewards: dict) -> None:
    """NoSignal when the held-out rewards at iteration 0 and every candidate's rewards on the first batch
    are one and the same value (an empty completion scoring 0 everywhere, say)."""
    if start is None or "rewards" not in start:  # a run begun before held-out results kept their rewards
        return
    candidates = [r for per_prompt in rewards.values() for r in per_prompt]
    values = set(start["rewards"]) | set(candidates)
    if len(values) == 1:
        raise NoSignal(f"no reward signal: all {len(start['rewards'])} held-out rewards and all {len(candidates)} "
                       f"candidate rewards of iteration 1 are {values.pop():.3f}, so training cannot learn "
                       "(samples above); check --prompt-format, --reward and --max-tokens, or pass --force",
                       start.get("samples", []))


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


def _accuracy(heldout: dict | None):
    return (heldout["accuracy"], heldout["accuracy_se"]) if heldout else None
