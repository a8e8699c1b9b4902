"""A replica of the run, and the population that scores every candidate in this process on one.

A population is what the ES loop (:func:`qes_edge.trainer.train`) asks to
score candidates and take updates.  Besides :class:`LocalPopulation` there is
:class:`qes_edge.fleet.Fleet`, whose Ray workers each hold a :class:`Replica`.
A population offers:

- ``with population:`` its replicas open at the run's checkpoint, closed after;
- ``with population.dirty():`` the span in which its copies may differ from
  the checkpoint (:mod:`qes_edge.working_copy`);
- ``score(seeds, iteration, stop)``: {(pair, sign): per-prompt rewards}, or
  None when ``stop.requested`` cut the iteration short (every copy restored);
- ``apply(history)``: the last row of ``history`` applied to every replica,
  (codes stepped, steps blocked);
- ``heldout()``: held-out accuracy and reward; ``report()``: extra metrics.
"""

from __future__ import annotations

import contextlib

import numpy as np

from .errors import QesError
from .es import iteration_batch, iteration_seeds
from .evaluator import Evaluator
from .faults import crash_point
from .gguf_file import ModelFile
from .kernels import support_seed
from .run import Run
from .scorer import Scorer
from .tasks import Task
from .working_copy import WorkingCopy


class Replica:
    """A working copy at the run's checkpoint with its own evaluator: scores candidates, takes updates."""

    def __init__(self, copy: WorkingCopy, model: ModelFile, task: Task):
        s = copy.run.settings
        prompts = copy.run.prompt_format(model)
        self.copy, self.task, self.settings = copy.open(model), task, s
        try:
            self.evaluator = Evaluator(copy.path, n_seq_max=max(s.batch, 1), n_threads=s.threads)
        except BaseException:
            copy.close()
            raise
        self.scorer = Scorer(self.evaluator, task, s.max_tokens or task.max_tokens, prompts)

    def rewards(self, signed_seed: int, iteration: int) -> list[float]:
        """Per-prompt rewards of checkpoint + perturbation(signed_seed) on the iteration's batch; restored after."""
        s = self.settings
        items = iteration_batch(self.task, s.seed, iteration, s.batch)
        support = support_seed(iteration_seeds(s.seed, iteration, s.population // 2))
        self.copy.space.perturb(signed_seed, support)
        crash_point("perturb")
        try:
            rewards = self.scorer.rewards(items)
            crash_point("evaluate")
        finally:
            self.copy.space.restore(signed_seed, support)
        return rewards

    def apply(self, history: list) -> tuple[int, int]:
        """This iteration's update (the last row of ``history``); returns (codes stepped, steps blocked)."""
        return self.copy.update(history)

    def heldout(self) -> dict:
        return self.scorer.heldout()

    def weights_sha256(self) -> str:
        return self.copy.weights_sha256()

    def close(self) -> None:
        self.evaluator.close()
        self.copy.close()


class LocalPopulation:
    """Every candidate scored in this process, one after another, on one replica of the run."""

    def __init__(self, run: Run):
        self.run = run
        self.model, self.task = run.open_model(), run.load_task()  # a bad model or task fails before any work
        self.copy = WorkingCopy(run)
        self.replica: Replica | None = None

    def __enter__(self):
        self.replica = Replica(self.copy, self.model, self.task)
        return self

    def __exit__(self, *exc):
        self.replica.close()

    @contextlib.contextmanager
    def dirty(self):
        self.copy.mark_dirty()
        yield
        self.copy.mark_clean()

    def score(self, seeds: np.ndarray, iteration: int, stop) -> dict | None:
        rewards = {}
        try:
            for p, seed in enumerate(seeds):
                for sign in (1, -1):
                    rewards[p, sign] = self.replica.rewards(sign * int(seed), iteration)
                if stop.requested:
                    return None
        except QesError:
            self.copy.mark_clean()  # every candidate was restored: the copy is the checkpoint again
            raise
        return rewards

    def apply(self, history: list) -> tuple[int, int]:
        return self.replica.apply(history)

    def heldout(self) -> dict:
        return self.replica.heldout()

    def report(self) -> dict:
        return {}
