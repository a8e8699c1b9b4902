"""The population on Ray: seeds and rewards travel, weights don't.

``qes-edge train --ray [ADDRESS]`` starts one Ray actor per worker slot.
Each actor (:class:`Worker`) builds its own replica of the run — a working
copy of the base model with the recorded updates replayed onto it, and its
own llama.cpp evaluator — and is told only which candidate to score: a
signed seed and the iteration number (the prompts follow from them).  It
sends back that candidate's per-prompt rewards.  The driver shapes them into
pair weights, checkpoints, and broadcasts (seeds, weights); every actor
applies the same update to its copy and reports the sha256 of its weights.
Replicas that disagree stop the run: one must never drift silently.

An actor that dies mid-iteration is dropped; its candidate goes back in the
queue for the others, and a replacement joins by rebuilding the driver's
checkpoint (the base model plus the recorded (seeds, weights) rows — a few
kilobytes) on its own machine.  Rewards are a pure function of (checkpoint,
seed, prompts), so which actor scored what never changes the result: the
run's bytes equal a single-process run's.  The driver holds no working copy
of its own: one an earlier session left is released when the fleet starts,
as it would fall behind the checkpoint.

Every worker needs qes-edge installed and the base model at the same path
as the driver (checked by sha256), plus the task file and any reward module
if the task uses them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import pickle
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import QesError
from .files import file_sha256
from .metrics import FleetReport, HeldOut
from .population import Population, candidates_left
from .replica import Replica
from .run import Run
from .working_copy import WorkingCopy

# Test hook, "<worker>:<point>:<n>": the worker of that index (not its replacement) SIGKILLs
# itself the n-th time it reaches crash point <point> (see qes_edge.faults).
WORKER_CRASH_ENV = "QES_EDGE_WORKER_CRASH_AT"


@dataclass
class FleetOptions:
    """Where the workers run and how many there are."""

    address: str = "local"  # "local": a new Ray instance here; "auto": the cluster running here; else its address
    workers: int | None = None  # default: the cluster's CPUs // threads per worker, at most the population


class Worker:
    """A Ray actor holding one replica of the run (see the module docstring).

    ``state``: the driver's state.json; the replica's copy, markers and sidecar
    go in a directory of the worker's own.
    """

    def __init__(self, state: dict, threads: int):
        self.state, self.threads = state, threads
        self.replica = self.run = None
        self.failure = None
        self.dir = None

    def start(self) -> dict:
        """Rebuild the driver's checkpoint here; returns where (host, paths) and the sha256 of the weights."""
        host = socket.gethostname()
        try:
            source = Path(self.state["source"])
            if not source.is_file():
                raise QesError(f"{host}: the base model {source} is not on this machine "
                               "(every worker needs it at the driver's path)")
            if file_sha256(source) != self.state["base_sha256"]:
                raise QesError(f"{host}: {source} is not the driver's base model (its sha256 differs)")
            self.dir = Path(tempfile.mkdtemp(prefix="qes-edge-worker-"))
            driver = Run.from_state(self.dir, self.state)
            self.run = dataclasses.replace(driver, live_path=None,
                                           settings=dataclasses.replace(driver.settings, threads=self.threads))
            self.replica = Replica(WorkingCopy(self.run), *self.run.inputs())
        except Exception as e:
            self.failure = f"{e}" if isinstance(e, QesError) else f"{type(e).__name__}: {e}"
            raise
        return {"host": host, "pid": os.getpid(), "paths": [str(self.run.live_path.parent), str(self.dir)],
                "weights_sha256": self.replica.weights_sha256()}

    def _replica(self):
        if self.replica is None:
            raise QesError(f"the worker could not start: {self.failure}")
        return self.replica

    def rewards(self, signed_seed: int, iteration: int) -> list[float]:
        return self._replica().rewards(signed_seed, iteration)

    def apply(self, seeds: np.ndarray, weights: np.ndarray) -> tuple[int, int, str]:
        replica = self._replica()
        self.run.history.append((seeds, weights))
        stepped, blocked = replica.apply(self.run.history)
        return stepped, blocked, replica.weights_sha256()

    def heldout(self) -> dict:
        return self._replica().heldout().to_json()  # as JSON: what the driver counts as sent is the same

    def close(self) -> None:
        if self.replica is not None:
            self.replica.close()
            self.replica.copy.release()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


class Fleet(Population):
    """The run's population on Ray workers."""

    def __init__(self, run: Run, options: FleetOptions):
        if (options.workers or 1) < 1:
            raise QesError(f"--workers must be at least 1, got {options.workers}")
        run.inputs()  # a bad model or task fails here, before Ray starts, not on every worker
        self.ray = _import_ray()
        self.run, self.options = run, options
        self.threads = run.settings.threads or 1
        self.started_ray = False
        self.workers: dict[int, object] = {}  # index -> actor handle
        self.started: dict[int, tuple] = {}  # index -> (ref of its start(), updates it was built with), until checked
        self.where: dict[int, dict] = {}
        self.next_index = 0
        self.replacements_left = 0
        self.sent = 0
        self.replaced = 0
        self.weights_sha256 = None

    def __enter__(self):
        WorkingCopy(self.run).release()
        self.started_ray = not self.ray.is_initialized()
        if self.started_ray:
            _connect(self.ray, self.options.address)
        try:
            self.remote_worker = self.ray.remote(Worker)
            cpus = int(self.ray.cluster_resources().get("CPU", 1))
            size = self.options.workers or max(1, min(self.run.settings.population, cpus // self.threads))
            self.replacements_left = 2 * size
            for _ in range(size):
                self._start()
            self._agree({i: digest for i, (digest, _) in self._check_started().items()}, "on joining")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def score(self, seeds: np.ndarray, iteration: int, stop, scored: dict, on_scored: Callable) -> dict | None:
        """{(pair, sign): per-prompt rewards}; candidates go to whichever worker is free."""
        queue = collections.deque(candidates_left(seeds, scored))
        idle = collections.deque(self.workers)
        pending: dict = {}  # ref -> (worker, candidate)
        rewards = dict(scored)
        while queue or pending:
            while queue and idle and not stop.requested:
                index, (p, sign) = idle.popleft(), queue.popleft()
                if index not in self.workers:
                    queue.appendleft((p, sign))
                    continue
                message = (sign * int(seeds[p]), iteration)
                pending[self.workers[index].rewards.remote(*message)] = (index, (p, sign))
                self._count(message)
            if not pending:
                break
            [ref], _ = self.ray.wait(list(pending), num_returns=1)
            index, candidate = pending.pop(ref)
            try:
                rewards[candidate] = self._get(ref, index)
                self._count(rewards[candidate])
                on_scored(candidate, rewards[candidate])
                idle.append(index)
            except _WorkerDied:
                queue.appendleft(candidate)  # scored again elsewhere
                idle.append(self._replace(index))
        if stop.requested:
            return None
        return rewards

    @contextlib.contextmanager
    def updated(self, history: list):
        """Broadcast this iteration's (seeds, weights); every replica applies it and reports its weights' sha256.
        Nothing to mark: a worker's copy is rebuilt from the checkpoint whenever one starts."""
        seeds, weights = history[-1]
        refs = {index: worker.apply.remote(seeds, weights) for index, worker in self.workers.items()}
        self._count((seeds, weights), times=len(refs))
        digests, stepped = {}, None
        for index, ref in refs.items():
            try:
                stepped_here, blocked_here, digests[index] = self._get(ref, index)
                self._count((stepped_here, blocked_here, digests[index]))
                stepped = stepped or (stepped_here, blocked_here)
            except _WorkerDied:
                self._replace(index)  # it rebuilds the checkpoint, this update included
        for index, (digest, rows) in self._check_started().items():
            if rows == len(history):  # joined during this broadcast, built with this update: compare it too
                digests[index] = digest
        self._agree(digests, f"after iteration {len(history)}")
        yield stepped or (None, None)

    def _agree(self, digests: dict, when: str) -> None:
        self.weights_sha256 = agreed_weights(digests, {i: self.where[i]["host"] for i in digests}, when) \
            or self.weights_sha256

    def heldout(self, on_judged: Callable[[int, int], None] = lambda done, total: None) -> HeldOut:
        while True:
            index = next(iter(self.workers))
            try:
                result = self._get(self.workers[index].heldout.remote(), index)
                self._count(result)
                return HeldOut.from_json(result)
            except _WorkerDied:
                self._replace(index)

    def report(self) -> FleetReport:
        """This iteration's traffic and fleet state, for the metrics line and progress bar."""
        report = FleetReport(self.sent, len(self.workers), self.replaced,
                             self.weights_sha256[:16] if self.weights_sha256 else None)
        self.sent = self.replaced = 0
        return report

    def close(self) -> None:
        workers, self.workers = self.workers, {}
        for index, worker in workers.items():
            try:
                self.ray.get(worker.close.remote(), timeout=60)
            except Exception:
                self._remove_local_files(index)
            self.ray.kill(worker)
        if self.started_ray and self.ray.is_initialized():
            self.ray.shutdown()
            self.started_ray = False

    # -- workers coming and going --

    def _start(self) -> int:
        index, self.next_index = self.next_index, self.next_index + 1
        options = {"num_cpus": self.threads, "max_restarts": 0, "max_task_retries": 0}
        crash = _crash_plan(index)
        if crash:
            options["runtime_env"] = {"env_vars": {"QES_EDGE_CRASH_AT": crash}}
        state = self.run.to_state()
        worker = self.remote_worker.options(**options).remote(state, self.threads)
        self._count(state)
        self.workers[index] = worker
        self.started[index] = (worker.start.remote(), len(self.run.history))
        return index

    def _check_started(self) -> dict:
        """Wait for workers that have not yet reported their start; {index: (weights' sha256, updates built with)}."""
        digests = {}
        while self.started:
            index, (ref, rows) = self.started.popitem()
            try:
                self.where[index] = self._get(ref, index)
                digests[index] = (self.where[index]["weights_sha256"], rows)
            except _WorkerDied:
                self._replace(index)
        return digests

    def _replace(self, index: int) -> int:
        """Drop a dead worker and start another from the driver's checkpoint; returns its index."""
        self.workers.pop(index, None)
        self.started.pop(index, None)
        self._remove_local_files(index)
        self.replaced += 1
        self.replacements_left -= 1
        if self.replacements_left < 0:
            raise QesError("Ray workers keep dying (more replacements than twice the fleet); "
                           "see the Ray logs (/tmp/ray/session_latest/logs)")
        return self._start()

    def _remove_local_files(self, index: int) -> None:
        """A killed worker on this machine leaves its working copy (RAM, on /dev/shm) behind."""
        where = self.where.get(index)
        if where and where["host"] == socket.gethostname():
            for path in where["paths"]:
                shutil.rmtree(path, ignore_errors=True)

    def _get(self, ref, index: int):
        exceptions = self.ray.exceptions
        try:
            return self.ray.get(ref)
        except exceptions.RayActorError:
            raise _WorkerDied(index) from None
        except exceptions.RayTaskError as e:
            cause = e.cause if getattr(e, "cause", None) is not None else e
            host = self.where.get(index, {}).get("host", "a worker")
            if isinstance(cause, QesError):
                raise QesError(str(cause) if str(cause).startswith(host) else f"{host}: {cause}") from None
            raise QesError(f"{host}: worker {index} failed: {type(cause).__name__}: {cause}") from None

    def _count(self, payload, times: int = 1) -> None:
        self.sent += times * len(pickle.dumps(payload))


class _WorkerDied(Exception):
    pass


def agreed_weights(digests: dict[int, str], hosts: dict[int, str], when: str) -> str | None:
    """The sha256 every replica's weights have; QesError naming them when they differ (one drifted)."""
    if len(set(digests.values())) > 1:
        detail = ", ".join(f"worker {i} on {hosts[i]}: {digest[:12]}" for i, digest in digests.items())
        raise QesError(f"replicas disagree {when} ({detail}); stopped at the previous checkpoint")
    return next(iter(digests.values()), None)


def _crash_plan(index: int) -> str | None:
    worker, _, point = os.environ.get(WORKER_CRASH_ENV, "").partition(":")
    return point if worker and int(worker) == index else None


def _import_ray():
    try:
        import ray
    except ImportError:
        raise QesError("--ray needs Ray: pip install 'qes-edge[ray]'") from None
    return ray


def _connect(ray, address: str) -> None:
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False,
             "configure_logging": True}
    try:
        if address in (None, "", "local"):
            ray.init(address="local", object_store_memory=128 * 2**20, **quiet)
        elif address == "auto":
            try:
                ray.init(address="auto", **quiet)
            except ConnectionError:
                ray.init(address="local", object_store_memory=128 * 2**20, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise QesError(f"cannot reach the Ray cluster at {address}: {e}") from None
