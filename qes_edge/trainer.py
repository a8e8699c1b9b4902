"""The ES loop: perturb, score, restore, shape, update, checkpoint — one iteration at a time.

The run directory holds everything a run needs to continue:

    state.json      settings, base model (path, sha256), completed iterations and the
                    (seeds, weights) row of each — the run's truth
    metrics.jsonl   one line per iteration (rewards, steps, held-out accuracy, times)
    residual.bin    the sidecar residual (residual = sidecar)
    live.dirty      present while the working copy differs from the checkpoint
    live.unsynced   the boot (Linux boot_id) in which the working copy and the sidecar
                    were last written without being synced to disk

The working copy (``live.gguf``, on /dev/shm when there is one) is a cache of
the checkpoint: if it is missing or dirty when a run resumes, it is rebuilt
from the source model by replaying the recorded updates, which are a
deterministic function of (seeds, weights).  So a run killed at any point
resumes to the same bytes an uninterrupted run gives.

Updates are not synced to disk every iteration (msync of the sidecar alone
writes up to 200 MB an iteration for the default model: 1% of an iteration
here, seconds on an SD card): a killed process leaves its writes in the page
cache, which the next process reads.  Only a power loss can lose them, so a copy last written in another
boot without a sync (``live.unsynced``) is rebuilt, like a dirty one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import __version__
from .errors import QesError
from .evaluator import Evaluator
from .faults import crash_point
from .gguf_file import (ModelFile, atomic_output, export_model, file_sha256, make_working_copy, open_model,
                        weights_sha256)
from .kernels import SCHEME, CodeSpace, TensorSlot, to_fixed
from .residual import NoResidual, ReplayResidual, SidecarResidual
from .settings import Settings
from .tasks import Item, Task, accuracy_with_stderr, load_task, mean_with_stderr

STATE_VERSION = 1


class RunInUse(QesError):
    """Another process is training this run."""

MAX_WEIGHT = 1 << 24  # |w| in 2**-15 steps: 512 code steps, far past any sane alpha


# ---- pure pieces of the algorithm -----------------------------------------------------------------

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


def shape_rewards(plus: list[list[float]], minus: list[list[float]], shaping: str) -> list[float]:
    """Per-pair coefficient c(+s) - c(-s) from the candidates' per-prompt rewards.

    tscore: each pair's mean per-prompt difference over its standard error, halved
    and clipped to +-3, so a pair counts as much as its evidence: c = 1 at two
    standard errors, and a difference the batch cannot tell from noise moves little;
    zscore: the pairs' mean differences over their root mean square, clipped to +-3
    (no signal, no step); rank: centred ranks of all candidates in [-1/2, 1/2].
    """
    if shaping == "tscore":
        return [_half_t(a, b) for a, b in zip(plus, minus)]
    plus, minus = [_mean(r) for r in plus], [_mean(r) for r in minus]
    if shaping == "rank":
        everything = plus + minus
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
    differences = [a - b for a, b in zip(plus, minus)]
    rms = math.sqrt(math.fsum(d * d for d in differences) / len(differences))
    if rms == 0:
        return [0.0] * len(differences)
    return [max(-3.0, min(3.0, d / rms)) for d in differences]


def _mean(rewards: list[float]) -> float:
    return math.fsum(rewards) / len(rewards)


def _half_t(plus: list[float], minus: list[float]) -> float:
    """Half the paired t statistic of (plus - minus) over the batch, clipped to +-3."""
    differences = [a - b for a, b in zip(plus, minus)]
    mean = _mean(differences)
    spread = math.fsum((d - mean) ** 2 for d in differences) / (len(differences) - 1)
    if spread == 0:  # every prompt moved the same way, or none moved
        return math.copysign(3.0, mean) if mean else 0.0
    return max(-3.0, min(3.0, mean / math.sqrt(spread / len(differences)) / 2))


def pair_weights(coefficients: list[float], alpha: float, sigma: float, population: int) -> np.ndarray:
    """w_p = alpha * c_p / (N sigma) in fixed point: this pair's share of the step, per unit delta."""
    weights = [to_fixed(alpha * c / (population * sigma)) for c in coefficients]
    return np.array([max(-MAX_WEIGHT, min(MAX_WEIGHT, w)) for w in weights], dtype=np.int64)


# ---- the run ----------------------------------------------------------------------------------------

@dataclass
class Progress:
    iteration: int
    iterations: int
    reward: float
    heldout: tuple[float, float] | None
    seconds: float
    bytes_sent: int | None = None  # with --ray: what crossed the network this iteration


@dataclass
class Run:
    run_dir: Path
    source: Path
    settings: Settings
    base_sha256: str
    iteration: int = 0
    history: list = field(default_factory=list)  # [(seeds, weights)] per completed iteration
    live_path: Path | None = None

    # -- creation and resumption --

    @classmethod
    def create(cls, run_dir: Path, source: Path, settings: Settings) -> "Run":
        settings.check()
        run_dir = Path(run_dir)
        if (run_dir / "state.json").exists():
            raise QesError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                           "or choose another --run-dir")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QesError(f"cannot create run directory {run_dir}: {e.strerror}") from None
        run = cls(run_dir, Path(source).resolve(), settings, file_sha256(source))
        run.save()
        return run

    @classmethod
    def load(cls, run_dir: Path, overrides: dict | None = None) -> "Run":
        run_dir = Path(run_dir)
        path = run_dir / "state.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise QesError(f"{run_dir} holds no run (no state.json)") from None
        except (OSError, ValueError) as e:
            raise QesError(f"{path} is unreadable: {e}") from None
        if state.get("version") != STATE_VERSION or state.get("scheme") != SCHEME:
            raise QesError(f"{run_dir} was written by an incompatible qes-edge "
                           f"(state {state.get('version')}, scheme {state.get('scheme')})")
        settings = Settings(**state["settings"])
        for key, value in (overrides or {}).items():
            if value is None or getattr(settings, key) == value:
                continue
            if key not in Settings.FREE_ON_RESUME:
                raise QesError(f"--{key.replace('_', '-')} differs from the run's ({getattr(settings, key)!r}); "
                               "it would change the result — start a new run instead")
            setattr(settings, key, value)
        settings.check()
        history = history_from_json(state["history"])
        return cls(run_dir, Path(state["source"]), settings, state["base_sha256"], state["iteration"], history,
                   Path(state["live"]) if state.get("live") else None)

    def save(self) -> None:
        """Atomically write state.json (the checkpoint)."""
        state = {
            "version": STATE_VERSION,
            "scheme": SCHEME,
            "qes_edge": __version__,
            "source": str(self.source),
            "base_sha256": self.base_sha256,
            "settings": dataclasses.asdict(self.settings),
            "iteration": self.iteration,
            "history": history_to_json(self.history),
            "live": str(self.live_path) if self.live_path else None,
        }
        _atomic_write(self.run_dir / "state.json", json.dumps(state, indent=1).encode())

    # -- the pieces a training session holds --

    def _live_location(self) -> Path:
        scratch = self._scratch_dir()
        if scratch == self.run_dir:
            return self.run_dir / "live.gguf"
        tag = hashlib.sha256(str(self.run_dir.resolve()).encode()).hexdigest()[:12]
        return scratch / f"qes-edge-{tag}" / "live.gguf"

    def _scratch_dir(self) -> Path:
        """Where working copies go: tmpfs when there is room (llama.cpp reads it at RAM speed), else the run dir."""
        shm = Path("/dev/shm")
        if shm.is_dir() and os.access(shm, os.W_OK) and _free_bytes(shm) > 2 * self.source.stat().st_size:
            return shm
        return self.run_dir

    def open_model(self) -> ModelFile:
        if not self.source.is_file():
            raise QesError(f"the run's source model {self.source} is missing")
        model = open_model(self.source, train_embeddings=self.settings.train_embeddings)
        if not model.trainable:
            reasons = sorted({t.reason for t in model.tensors})
            raise QesError(f"{self.source} has no trainable tensors ({'; '.join(reasons)})")
        return model

    def prepare_live(self, model: ModelFile) -> tuple[np.memmap, CodeSpace, object]:
        """A working copy at this run's checkpoint, its code space and residual store.

        Reuses the live copy when it is clean; otherwise rebuilds it from the source
        by replaying every recorded update (deterministic, so the same bytes).
        """
        dirty = self.run_dir / "live.dirty"
        if self._live_is_clean():
            return self._open_live(model, self.live_path, self.run_dir / "residual.bin")
        self.live_path = self._live_location()
        dirty.touch()
        self.save()
        opened = self.rebuild(model, self.live_path, self.run_dir / "residual.bin")
        dirty.unlink()
        return opened

    def _live_is_clean(self) -> bool:
        """True when the live copy (and the sidecar, if any) hold exactly the checkpoint."""
        live = self.live_path
        clean = live is not None and live.is_file() and not (self.run_dir / "live.dirty").exists()
        unsynced = self.run_dir / "live.unsynced"
        if clean and unsynced.exists():
            clean = unsynced.read_text() == boot_id()  # else writes may have died with the machine
        if clean and self.settings.error_feedback and self.settings.residual == "sidecar":
            clean = (self.run_dir / "residual.bin").exists()
        return clean

    def rebuild(self, model: ModelFile, live: Path, residual_path: Path):
        """Copy the source to ``live`` and replay every recorded update onto it."""
        if file_sha256(self.source) != self.base_sha256:
            raise QesError(f"the source model {self.source} changed since the run started; "
                           "its checkpoint cannot be rebuilt")
        make_working_copy(self.source, live)
        residual_path.unlink(missing_ok=True)
        buf, space, store = self._open_live(model, live, residual_path)
        for t in range(len(self.history)):
            store.update(space, self.history[:t + 1], self.settings.decay)
        buf.flush()
        return buf, space, store

    def _open_live(self, model: ModelFile, live: Path, residual_path: Path):
        buf = np.memmap(live, dtype=np.uint8, mode="r+")
        slots = [TensorSlot(t.name, t.ggml_type, t.offset, t.n_elements) for t in model.trainable]
        space = CodeSpace(buf, slots, self.settings.sigma)
        s = self.settings
        if not s.error_feedback:
            store = NoResidual()
        elif s.residual == "replay":
            store = ReplayResidual(s.window)
        else:
            store = SidecarResidual(residual_path, model.fingerprint, space.n_codes)
        return buf, space, store

    @contextlib.contextmanager
    def lock(self):
        """Held while a process trains this run; raises RunInUse when another one does."""
        handle = open(self.run_dir / "lock", "w")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunInUse(f"{self.run_dir} is being trained by another process") from None
            yield
        finally:
            handle.close()

    # -- training --

    def train(self, on_progress: Callable[[Progress], None] = lambda p: None,
              on_heldout: Callable[[int, dict], None] = lambda t, m: None, fleet=None) -> dict:
        """Run the remaining iterations; ``fleet`` (a :class:`qes_edge.fleet.FleetOptions`) scores on Ray."""
        with self.lock():
            return self._train(on_progress, on_heldout, fleet)

    def _train(self, on_progress, on_heldout, fleet) -> dict:
        s = self.settings
        model = self.open_model()
        task = load_task(s.task, s.reward, seed=s.seed, heldout=s.heldout)
        metrics_path = self.run_dir / "metrics.jsonl"
        _truncate_metrics(metrics_path, self.iteration)
        pairs = s.population // 2
        stop = _StopFlag()
        started = time.perf_counter()
        if fleet is None:
            population = LocalPopulation(Replica(self, model, task))
        else:
            from .fleet import Fleet

            population = Fleet(self, fleet)
        with population:
            if self.iteration == 0 and not _has_heldout(metrics_path, 0):
                result = population.heldout()
                _append_metrics(metrics_path, {"iteration": 0, "heldout": result})
                on_heldout(0, result)
            with stop.installed():
                while self.iteration < s.iterations and not stop.requested:
                    t = self.iteration
                    t0 = time.perf_counter()
                    seeds = iteration_seeds(s.seed, t, pairs)
                    (self.run_dir / "live.dirty").touch()
                    try:
                        rewards = population.score(seeds, t, stop)
                    except QesError:
                        (self.run_dir / "live.dirty").unlink()  # restored: the copy is the checkpoint
                        raise
                    if rewards is None:  # stopped between candidates, the copy restored
                        (self.run_dir / "live.dirty").unlink()
                        break
                    t1 = time.perf_counter()
                    plus = [rewards[p, 1] for p in range(pairs)]  # per-prompt rewards of each +s candidate
                    minus = [rewards[p, -1] for p in range(pairs)]
                    weights = pair_weights(shape_rewards(plus, minus, s.shaping), s.alpha, s.sigma, s.population)
                    plus, minus = [_mean(r) for r in plus], [_mean(r) for r in minus]  # candidates' means, logged
                    self.history.append((seeds, weights))
                    stepped, blocked = population.apply(self.history)
                    t2 = time.perf_counter()
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
                    self.iteration = t + 1
                    if self.iteration % s.eval_every == 0 or self.iteration == s.iterations:
                        line["heldout"] = population.heldout()
                        on_heldout(self.iteration, line["heldout"])
                    line.update(population.report())
                    line["iteration_s"] = round(time.perf_counter() - t0, 3)
                    _append_metrics(metrics_path, line)
                    self.save()
                    (self.run_dir / "live.dirty").unlink()
                    on_progress(Progress(self.iteration, s.iterations, line["reward_mean"],
                                         _accuracy(line.get("heldout")), time.perf_counter() - started,
                                         line.get("bytes_sent")))
        return {"completed": self.iteration >= s.iterations, "iteration": self.iteration,
                "seconds": time.perf_counter() - started, "metrics": metrics_path}

    def export(self, out: Path) -> Path:
        """Write the checkpoint's model to ``out`` with ``qes.*`` provenance.

        From the live copy when it holds the checkpoint; otherwise (a run being
        trained right now, a crashed one, one whose live copy was released) from a
        copy rebuilt in a temporary directory and removed after, so the trainer's
        live (perhaps perturbed) copy is never read or touched.
        """
        model = self.open_model()
        try:
            with self.lock():
                if self._live_is_clean():
                    self._export_file(self.live_path, out)
                    return Path(out)
        except RunInUse:
            pass
        with tempfile.TemporaryDirectory(prefix="qes-edge-export-", dir=self._scratch_dir()) as tmp:
            buf, _, store = self.rebuild(model, Path(tmp) / "live.gguf", Path(tmp) / "residual.bin")
            store.close()
            del buf
            self._export_file(Path(tmp) / "live.gguf", out)
        return Path(out)

    def release_live(self) -> None:
        """Delete the live copy (it lives in RAM on /dev/shm); a later export or resume rebuilds it."""
        with self.lock():
            live = self.live_path
            self.live_path = None
            self.save()
            (self.run_dir / "live.unsynced").unlink(missing_ok=True)
            if live is not None:
                live.unlink(missing_ok=True)
                if live.parent.name.startswith("qes-edge-"):
                    shutil.rmtree(live.parent, ignore_errors=True)

    def _export_file(self, live: Path, out: Path) -> None:
        s = self.settings
        provenance = {
            "version": __version__, "base_sha256": self.base_sha256, "base_file": self.source.name,
            "task": s.task, "reward": s.reward or "", "iterations": self.iteration, "sigma": s.sigma,
            "alpha": s.alpha, "decay": s.decay, "population": s.population, "batch": s.batch,
            "residual": s.residual if s.error_feedback else "none", "window": s.window, "seed": s.seed,
            "scheme": SCHEME,
        }
        export_model(live, out, provenance, protect=[self.source])


class Replica:
    """A working copy at the run's checkpoint with its own evaluator: scores candidates, takes updates.

    The single-process trainer holds one; with --ray every worker holds one (:mod:`qes_edge.fleet`).
    """

    def __init__(self, run: Run, model: ModelFile, task: Task):
        s = run.settings
        self.model, self.task, self.settings = model, task, s
        self.buf, self.space, self.store = run.prepare_live(model)
        self.boot = boot_id()  # None: no way to tell a reboot, so every update is synced
        self.unsynced = run.run_dir / "live.unsynced"
        if self.boot:
            _atomic_write(self.unsynced, self.boot.encode())
        self.evaluator = Evaluator(run.live_path, n_seq_max=max(s.batch, 1), n_threads=s.threads)
        self.scorer = Scorer(self.evaluator, task, s.max_tokens or task.max_tokens)

    def rewards(self, signed_seed: int, iteration: int) -> list[float]:
        """Per-prompt rewards of checkpoint + perturbation(signed_seed) on the iteration's batch; restored after."""
        s = self.settings
        items = iteration_batch(self.task, s.seed, iteration, s.batch)
        self.space.perturb(signed_seed)
        crash_point("perturb")
        try:
            rewards = self.scorer.rewards(items)
            crash_point("evaluate")
        finally:
            self.space.restore(signed_seed)
        return rewards

    def apply(self, history: list) -> tuple[int, int]:
        """This iteration's update (the last row of ``history``); returns (codes stepped, steps blocked)."""
        result = self.store.update(self.space, history, self.settings.decay)
        crash_point("update")
        if self.boot is None:
            self.sync()
        return result

    def sync(self) -> None:
        """Put the working copy and the residual on disk."""
        self.buf.flush()
        self.store.flush()

    def heldout(self) -> dict:
        return self.scorer.heldout()

    def fingerprint(self) -> str:
        return weights_sha256(self.model, self.buf)

    def close(self) -> None:
        self.evaluator.close()
        self.sync()
        self.store.close()
        del self.buf
        self.unsynced.unlink(missing_ok=True)


class LocalPopulation:
    """Every candidate scored in this process, one after another, on one replica."""

    def __init__(self, replica: Replica):
        self.replica = replica

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.replica.close()

    def score(self, seeds: np.ndarray, iteration: int, stop) -> dict | None:
        """{(pair, sign): per-prompt rewards}, or None when a stop was asked for between pairs."""
        rewards = {}
        for p, seed in enumerate(seeds):
            for sign in (1, -1):
                rewards[p, sign] = self.replica.rewards(sign * int(seed), iteration)
            if stop.requested:
                return None
        return rewards

    def apply(self, history: list) -> tuple[int, int]:
        return self.replica.apply(history)

    def heldout(self) -> dict:
        return self.replica.heldout()

    def report(self) -> dict:
        return {}


class Scorer:
    """Rewards of the model as it is in the working copy right now."""

    def __init__(self, evaluator: Evaluator, task: Task, max_tokens: int):
        self.evaluator, self.task, self.max_tokens = evaluator, task, max_tokens

    def rewards(self, items: list[Item]) -> list[float]:
        prompts = [item.prompt for item in items]
        if self.task.uses_logprob:
            answers = [self.evaluator.completion_tokens(item.answer) for item in items]
            totals = self.evaluator.logprob(prompts, answers)
            return [total / max(1, len(tokens)) for total, tokens in zip(totals, answers)]
        completions = self.evaluator.generate(prompts, self.max_tokens, self.task.stop)
        return [self.task.reward(c.text, item) for c, item in zip(completions, items)]

    def heldout(self) -> dict:
        items = self.task.heldout
        completions = self.evaluator.generate([i.prompt for i in items], self.max_tokens, self.task.stop)
        correct = [self.task.correct(c.text, i) for c, i in zip(completions, items)]
        accuracy, accuracy_se = accuracy_with_stderr(correct)
        rewards = self.rewards(items) if self.task.uses_logprob else \
            [self.task.reward(c.text, i) for c, i in zip(completions, items)]
        reward, reward_se = mean_with_stderr(rewards)
        return {"n": len(items), "accuracy": accuracy, "accuracy_se": accuracy_se,
                "reward": reward, "reward_se": reward_se, "correct": [int(c) for c in correct]}


class _StopFlag:
    """First Ctrl-C: finish the candidate, restore, checkpoint, stop. Second: stop now."""

    requested = False

    def installed(self):
        flag = self

        class _Installed:
            def __enter__(self):
                self.previous = signal.getsignal(signal.SIGINT)
                try:
                    signal.signal(signal.SIGINT, flag._handle)
                except ValueError:  # not the main thread
                    self.previous = None

            def __exit__(self, *exc):
                if self.previous is not None:
                    signal.signal(signal.SIGINT, self.previous)

        return _Installed()

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def _accuracy(heldout: dict | None):
    return (heldout["accuracy"], heldout["accuracy_se"]) if heldout else None


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_output(path, f"cannot write {path}") as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crash_point("checkpoint")


def history_to_json(history: list) -> list:
    """The (seeds, weights) rows as JSON lists, as state.json holds them."""
    return [[s.tolist(), w.tolist()] for s, w in history]


def history_from_json(rows: list) -> list:
    return [(np.array(s, dtype=np.int64), np.array(w, dtype=np.int64)) for s, w in rows]


def boot_id() -> str | None:
    """This boot's id (changes at every reboot), or None where the system does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _free_bytes(path: Path) -> int:
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _append_metrics(path: Path, line: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(line) + "\n")


def _read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            break  # a line torn by a crash: everything after it is redone
    return lines


def _truncate_metrics(path: Path, iteration: int) -> None:
    """Drop lines past the checkpoint (written before a crash cut the iteration short)."""
    kept = [m for m in _read_metrics(path) if m["iteration"] <= iteration]
    _atomic_write(path, "".join(json.dumps(m) + "\n" for m in kept).encode())


def _has_heldout(path: Path, iteration: int) -> bool:
    return any(m["iteration"] == iteration and "heldout" in m for m in _read_metrics(path))


def read_metrics(run_dir: Path) -> list[dict]:
    return _read_metrics(Path(run_dir) / "metrics.jsonl")
