"""A run directory: the checkpoint (state.json), the metrics, the marker files and the lock.

    state.json       settings, base model (path, sha256), completed iterations and the
                     (seeds, weights) row of each: the run's truth
    metrics.jsonl    one line per iteration (rewards, steps, held-out accuracy, times)
    live.gguf        the working copy, when /dev/shm has no room for it
    residual.bin     the sidecar residual (--residual sidecar)
    live.dirty       present while the working copy differs from the checkpoint
    live.unsynced    the boot in which the working copy was last written without a sync
    lock             held by the process that trains the run
    scored.json      the rewards of the candidates scored so far in the iteration under way
    reward_curve.png

An iteration ends in :meth:`Run.checkpoint`: its metrics line is appended,
then state.json is replaced whole.  Everything else in the directory is a
cache of state.json (:mod:`qes_edge.working_copy` rebuilds it), and metrics
past the checkpoint (or torn by a crash) are dropped when a run resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .errors import QesError
from .faults import crash_point
from .files import atomic_output, file_sha256
from .model_file import ModelFile, open_model
from .kernels import SCHEME
from .metrics import HeldOut, MetricsLine
from .models import model_stem
from .ollama import OllamaModel
from .phases import CHECKPOINT, METRICS, timed
from .settings import Settings
from .tasks import Task
from .tasks.prompt_format import PromptFormat

STATE_VERSION = 1


class RunInUse(QesError):
    """Another process is training this run."""


class RunFiles:
    """The files of a run directory, by name (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.state = self.root / "state.json"
        self.metrics = self.root / "metrics.jsonl"
        self.live = self.root / "live.gguf"
        self.residual = self.root / "residual.bin"
        self.dirty = self.root / "live.dirty"
        self.unsynced = self.root / "live.unsynced"
        self.lock = self.root / "lock"
        self.scored = self.root / "scored.json"
        self.reward_curve = self.root / "reward_curve.png"


@dataclass
class Run:
    """A run as its state.json records it: the checkpoint that training continues from."""

    run_dir: Path
    source: Path
    settings: Settings
    base_sha256: str
    iteration: int = 0
    history: list = field(default_factory=list)  # [(seeds, weights)] per completed iteration
    live_path: Path | None = None  # the working copy, while there is one
    base_file: str = ""  # the model as the user named it (qes.base_file): the source's file name, or ollama:NAME:TAG
    ollama: dict | None = None  # for a model from Ollama's store, what its Modelfile said (OllamaModel.record)
    made_with: str = __version__  # the qes-edge version its exports record (qes.version)

    @property
    def files(self) -> RunFiles:
        return RunFiles(self.run_dir)

    # -- state.json --

    def __post_init__(self):
        self.base_file = self.base_file or self.source.name

    @property
    def stem(self) -> str:
        """A file-name stem for the run's model (the tuned GGUF's default name)."""
        return model_stem(self.source, self.base_file if self.ollama else None)

    @classmethod
    def create(cls, run_dir: Path, source: Path, settings: Settings, ollama: OllamaModel | None = None) -> Run:
        """A new run of ``settings`` on ``source``, its state saved; --sigma and --alpha not given take the
        defaults for the model's codes (:meth:`Settings.for_codes`)."""
        settings.check()
        run_dir = Path(run_dir)
        if RunFiles(run_dir).state.exists():
            raise QesError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                           "or choose another --run-dir")
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise QesError(f"cannot create run directory {run_dir}: {e.strerror}") from None
        settings = settings.for_codes(open_model(source, settings.train_embeddings).codes_by_type)
        run = cls(run_dir, Path(source).resolve(), settings, file_sha256(source),
                  base_file=ollama.reference if ollama else Path(source).name,
                  ollama=ollama.record() if ollama else None)
        run.save()
        return run

    @classmethod
    def load(cls, run_dir: Path, given: dict | None = None) -> Run:
        """The run in ``run_dir``, with the settings in ``given`` changed (see :meth:`Settings.resumed_with`)."""
        path = RunFiles(run_dir).state
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise QesError(f"{run_dir} holds no run (no state.json)") from None
        except (OSError, ValueError) as e:
            raise QesError(f"{path} is unreadable: {e}") from None
        run = cls.from_state(Path(run_dir), state)
        run.settings = run.settings.resumed_with(given or {})
        return run

    @classmethod
    def from_state(cls, run_dir: Path, state: dict) -> Run:
        """The run that ``state`` (state.json's contents) describes, its files in ``run_dir``."""
        if state.get("version") != STATE_VERSION or state.get("scheme") != SCHEME:
            raise QesError(f"{run_dir} was written by an incompatible qes-edge "
                           f"(state {state.get('version')}, scheme {state.get('scheme')})")
        history = [(np.array(s, dtype=np.int64), np.array(w, dtype=np.int64)) for s, w in state["history"]]
        return cls(run_dir, Path(state["source"]), Settings(**state["settings"]), state["base_sha256"],
                   state["iteration"], history, Path(state["live"]) if state.get("live") else None,
                   state.get("base_file", ""), state.get("ollama"))

    def at(self, iteration: int) -> Run:
        """The run as its checkpoint was after ``iteration`` completed iterations (its first updates only).

        It has no working copy (the run's copy holds the latest checkpoint), so
        exporting it rebuilds the model by replay.
        """
        if not 0 <= iteration <= self.iteration:
            raise QesError(f"{self.run_dir} has completed {self.iteration} iterations; "
                           f"iteration {iteration} is not one of them (0 is the base model)")
        return dataclasses.replace(self, iteration=iteration, history=self.history[:iteration], live_path=None)

    def to_state(self) -> dict:
        """state.json's contents; the fleet sends the same to its workers."""
        return {
            "version": STATE_VERSION,
            "scheme": SCHEME,
            "qes_edge": __version__,
            "source": str(self.source),
            "base_sha256": self.base_sha256,
            "settings": dataclasses.asdict(self.settings),
            "iteration": self.iteration,
            "history": [[s.tolist(), w.tolist()] for s, w in self.history],
            "live": str(self.live_path) if self.live_path else None,
            "base_file": self.base_file,
            "ollama": self.ollama,
        }

    @timed(CHECKPOINT)
    def save(self) -> None:
        write_atomically(self.files.state, json.dumps(self.to_state(), indent=1).encode())

    def checkpoint(self, line: MetricsLine) -> None:
        """End an iteration: its metrics line, then state.json (the checkpoint itself)."""
        self.append_metrics(line)
        self.save()
        self.files.scored.unlink(missing_ok=True)

    # -- scored.json: the candidates scored so far in the iteration under way --

    def scored(self) -> dict:
        """{(pair, sign): per-prompt rewards} of the candidates a run stopped or killed in this iteration
        had scored ({} when none): a candidate's rewards are a pure function of the checkpoint and
        its seed, so they are not scored again."""
        try:
            kept = json.loads(self.files.scored.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(kept, dict) or kept.get("iteration") != self.iteration:
            return {}  # left by an iteration that then completed
        return {(p, sign): rewards for p, sign, rewards in kept["rewards"]}

    @timed(CHECKPOINT)
    def keep_scored(self, scored: dict) -> None:
        rows = [[p, sign, [float(r) for r in rewards]] for (p, sign), rewards in sorted(scored.items())]
        write_atomically(self.files.scored, json.dumps({"iteration": self.iteration, "rewards": rows}).encode())

    @contextlib.contextmanager
    def lock(self):
        """Held while a process trains the run or touches its working copy; RunInUse when another one does."""
        handle = open(self.files.lock, "w")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunInUse(f"{self.run_dir} is being trained by another process") from None
            yield
        finally:
            handle.close()

    # -- metrics.jsonl --

    def truncate_metrics(self) -> None:
        """Drop lines past the checkpoint (written before a crash cut the iteration short)."""
        kept = [m for m in read_metrics(self.run_dir) if m.iteration <= self.iteration]
        write_atomically(self.files.metrics, "".join(json.dumps(m.to_json()) + "\n" for m in kept).encode())

    @timed(METRICS)
    def append_metrics(self, line: MetricsLine) -> None:
        with open(self.files.metrics, "a") as f:
            f.write(json.dumps(line.to_json()) + "\n")

    def best_heldout(self) -> tuple[int, HeldOut]:
        """The completed iteration with the highest recorded held-out accuracy (the earliest of ties), and its result."""
        evaluated = [(m.iteration, m.heldout) for m in read_metrics(self.run_dir)
                     if m.heldout and m.iteration <= self.iteration]
        if not evaluated:
            raise QesError(f"{self.run_dir} has no held-out evaluation yet; choose one with --iteration")
        return max(evaluated, key=lambda e: (e[1].accuracy, -e[0]))

    def heldout(self, iteration: int) -> HeldOut | None:
        """The held-out result recorded at ``iteration``, if there is one."""
        return next((m.heldout for m in read_metrics(self.run_dir) if m.iteration == iteration and m.heldout),
                    None)

    # -- what the run trains and on what --

    def open_model(self) -> ModelFile:
        if not self.source.is_file():
            raise QesError(f"the run's source model {self.source} is missing")
        model = open_model(self.source, train_embeddings=self.settings.train_embeddings)
        if not model.trainable:
            reasons = sorted({t.reason for t in model.tensors})
            raise QesError(f"{self.source} has no trainable tensors ({'; '.join(reasons)})")
        return model

    def inputs(self) -> tuple[ModelFile, Task]:
        """The run's source model and task, its prompt format checked for the model: a bad one fails here."""
        model, task = self.open_model(), self.settings.load_task()
        PromptFormat.choose(self.settings.prompt_format, self.base_file, model.has_chat_template)
        return model, task

    def provenance(self) -> dict:
        """The tuned GGUF's qes.* records: where it came from and the settings that made it."""
        records = {"version": self.made_with, "base_sha256": self.base_sha256, "base_file": self.base_file,
                   **self.settings.provenance()}
        records["iterations"] = self.iteration  # completed, which may be fewer than asked for
        records["scheme"] = SCHEME
        return records


def read_metrics(run_dir: Path) -> list[MetricsLine]:
    path = RunFiles(run_dir).metrics
    if not path.exists():
        return []
    lines = []
    for text in path.read_text().splitlines():
        try:
            fields = json.loads(text)
        except ValueError:
            break  # a line torn by a crash: everything after it is redone
        lines.append(MetricsLine.from_json(fields))
    return lines


def write_atomically(path: Path, data: bytes) -> None:
    """``path`` holds ``data``, on disk, or is as it was."""
    with atomic_output(path, f"cannot write {path}") as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        crash_point("checkpoint")
