"""A replica of the run, and the population that scores every candidate in this process on its replicas.

A :class:`Replica` is a working copy at the run's checkpoint with a scorer of
its own; :class:`LocalPopulation` holds one or several, and
:class:`qes_edge.fleet.Fleet`'s Ray workers each hold one.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Callable

import numpy as np

from .errors import QesError
from .es import iteration_batch, iteration_seeds
from .faults import crash_point
from .kernels import support_seed
from .metrics import HeldOut
from .model_file import ModelFile
from .phases import HELDOUT, timed
from .population import Population, candidates_left
from .run import Run
from .scorer import open_scorer
from .tasks import Task
from .working_copy import Mirror, WorkingCopy


class Replica:
    """A working copy at the run's checkpoint with its own evaluator: scores candidates, takes updates.

    ``copy``: a :class:`WorkingCopy`, or a :class:`Mirror` of one (which takes no updates of its own).
    """

    def __init__(self, copy: WorkingCopy | Mirror, model: ModelFile, task: Task, threads: int | None = None):
        s = copy.run.settings
        self.copy, self.task, self.settings = copy.open(model), task, s
        try:
            self.scorer = open_scorer(copy.path, s, model, copy.run.base_file, n_seq_max=max(s.batch, 1),
                                      threads=threads, task=task)
        except BaseException:
            copy.close()
            raise
        self.copy.space.threads = self.scorer.evaluator.n_threads  # its kernels keep to its share of the cores
        self.worn: tuple[int, int] | None = None  # (seed, support) of a perturbation left on the copy

    def rewards(self, signed_seed: int, iteration: int, keep: bool = False) -> list[float]:
        """Per-prompt rewards of checkpoint + perturbation(signed_seed) on the iteration's batch.

        The perturbation is restored after, or with ``keep`` left on the copy
        until :meth:`take_off`, or the next candidate's in one walk of the
        iteration's support, replaces it.
        """
        s = self.settings
        items = iteration_batch(self.task, s.seed, iteration, s.batch)
        support = support_seed(iteration_seeds(s.seed, iteration, s.population // 2))
        if self.worn is not None and self.worn[1] == support:
            self.copy.space.swap(self.worn[0], signed_seed, support)
        else:
            self.take_off()
            self.copy.space.perturb(signed_seed, support)
        self.worn = (signed_seed, support)
        crash_point("perturb")
        try:
            rewards = self.scorer.rewards(items)
            crash_point("evaluate")
        except BaseException:
            self.take_off()
            raise
        if not keep:
            self.take_off()
        return rewards

    def take_off(self) -> None:
        """Restore the perturbation :meth:`rewards` left on the copy, if any: the copy is the checkpoint again."""
        if self.worn is not None:
            self.copy.space.restore(*self.worn)
            self.worn = None

    def apply(self, history: list) -> tuple[int, int]:
        """This iteration's update (the last row of ``history``); returns (codes stepped, steps blocked)."""
        return self.copy.update(history)

    def heldout(self) -> HeldOut:
        return self.scorer.heldout()

    def weights_sha256(self) -> str:
        return self.copy.weights_sha256()

    def close(self) -> None:
        self.scorer.close()
        self.copy.close()


class LocalPopulation(Population):
    """Every candidate scored in this process: on one replica, or on several side by side.

    The first replica is the run's working copy; each other one is a
    :class:`Mirror` of it with its own llama.cpp context, and scores in a
    thread of its own (llama.cpp runs without the GIL).  A candidate's score
    depends only on the copy's bytes and the candidate, and the held-out
    items go out in the waves one replica decodes them in, so any number of
    replicas gives one replica's rewards, verdicts and bytes.
    """

    def __init__(self, run: Run, replicas: int = 1, threads: int | None = None):
        self.run = run
        self.model, self.task = run.inputs()  # a bad model or task fails before any work
        self.copy = WorkingCopy(run)
        self.size, self.threads = replicas, threads
        self.replicas: list[Replica] = []

    def __enter__(self):
        try:
            self.replicas.append(Replica(self.copy, self.model, self.task, self.threads))
            for index in range(1, self.size):
                self.replicas.append(Replica(Mirror(self.copy, index), self.model, self.task, self.threads))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for replica in reversed(self.replicas):  # mirrors first: the working copy closes last
            replica.close()
        self.replicas = []

    def score(self, seeds: np.ndarray, iteration: int, stop, scored: dict, on_scored: Callable) -> dict | None:
        candidates = candidates_left(seeds, scored)

        def score_one(replica: Replica, candidate: tuple) -> list:
            rewards = replica.rewards(candidate[1] * int(seeds[candidate[0]]), iteration, keep=True)
            on_scored(candidate, rewards)
            return rewards

        with self.copy.changing(restored_on=QesError):  # a QesError comes with every candidate taken off
            try:
                rewards = self._share(candidates, score_one, stop)
            finally:
                for replica in self.replicas:
                    replica.take_off()
        return None if stop.requested else {**scored, **dict(zip(candidates, rewards))}

    @contextlib.contextmanager
    def updated(self, history: list):
        with self.copy.changing():
            result = self.replicas[0].apply(history)
            for mirror in self.replicas[1:]:
                mirror.copy.follow()
            yield result

    @timed(HELDOUT)
    def heldout(self, on_judged: Callable[[int, int], None] = lambda done, total: None) -> HeldOut:
        items = self.task.heldout
        wave = self.replicas[0].scorer.evaluator.n_seq_max  # what one replica decodes together
        waves = [items[i:i + wave] for i in range(0, len(items), wave)]
        done, counting = [0], threading.Lock()

        def judge(replica: Replica, items_of_wave: list) -> list:
            rows = replica.scorer.judge(items_of_wave)
            with counting:
                done[0] += len(items_of_wave)
                on_judged(done[0], len(items))
            return rows

        judged = self._share(waves, judge)
        return HeldOut.of(items, [row for rows in judged for row in rows])

    def _share(self, jobs: list, work: Callable, stop=None) -> list:
        """[work(replica, job) for job in jobs], each job done by whichever replica is free (None for a job
        not done because ``stop.requested``).  The first replica works in this thread, so Ctrl-C reaches it
        as usual.  At the first failure no more jobs are taken; it is raised once every replica has
        finished the job it has."""
        pending = collections.deque(enumerate(jobs))
        done, failures, closed = [None] * len(jobs), [], threading.Event()

        def serve(replica: Replica) -> None:
            while not failures and not closed.is_set() and not (stop and stop.requested):
                try:
                    index, job = pending.popleft()
                except IndexError:
                    return
                try:
                    done[index] = work(replica, job)
                except Exception as e:
                    failures.append(e)

        helpers = [threading.Thread(target=serve, args=(r,), name=f"replica-{i}")
                   for i, r in enumerate(self.replicas[1:], 1)]
        for helper in helpers:
            helper.start()
        try:
            serve(self.replicas[0])
        finally:
            closed.set()  # after a KeyboardInterrupt here, the helpers take no more jobs
            for helper in helpers:
                helper.join()
        if failures:
            raise failures[0]
        return done
