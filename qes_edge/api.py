"""The library the CLI and the scripts call: start or resume a run, train it, score a model on a task, export.

    training = start(source, Settings(iterations=10))   # or resume(Run.load(run_dir))
    result = train(training)                              # trains, writes training.out, releases the copy
    with open_scorer(path, settings, open_model(path)) as scorer:
        print(scorer.heldout().accuracy)
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import preflight
from .errors import QesError
from .fleet import Fleet, FleetOptions
from .metrics import HeldOut
from .model_file import open_model
from .models import default_model_path, find_model, model_stem, tuned_file
from .ollama import OllamaModel
from .replica import LocalPopulation
from .run import Run, RunInUse
from .scorer import open_scorer
from .settings import Settings
from .trainer import NoSignal, Progress, Trained
from .trainer import train as train_run
from .working_copy import export, release

__all__ = ["Training", "start", "resume", "train", "open_scorer", "export", "find_model", "default_model_path",
           "open_model", "Run", "Settings", "FleetOptions", "NoSignal"]


@dataclass
class Training:
    """A run ready to train here, and how."""

    run: Run
    out: Path | None = None  # the tuned GGUF written when training ends; None: none
    replicas: int = 1  # replicas scoring candidates in this process (1 with a fleet: its workers score)
    threads: int | None = None  # llama.cpp threads per replica (None: --threads, else the physical cores)
    fleet: FleetOptions | None = None  # score on Ray workers instead


def start(source: Path, settings: Settings, *, ollama: OllamaModel | None = None, run_dir: Path | None = None,
          out: Path | None = None, fleet: FleetOptions | None = None, replicas: int | None = None,
          threads: int | None = None) -> Training:
    """A new run of ``source`` (from Ollama's store: ``ollama``) with ``settings``, checked to fit here first.

    ``run_dir`` defaults to runs/<model>-<time>, ``out`` to RUN_DIR/<model>.qes.gguf; ``replicas`` to as
    many as fit (:func:`qes_edge.preflight.replicas`), ``threads`` to the cores shared out among them.
    """
    source = Path(source)
    if not source.is_file():
        raise QesError(f"model file not found: {source}")
    settings.check()
    stem = model_stem(source, ollama.reference if ollama else None)
    run_dir = Path(run_dir) if run_dir else Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = out or tuned_file(run_dir, stem)
    model = open_model(source, train_embeddings=settings.train_embeddings)
    replicas = replicas or (1 if fleet else preflight.replicas(model, settings))
    preflight.check(model, settings, run_dir, out, fleet=fleet is not None, replicas=replicas)
    run = Run.create(run_dir, source, settings, ollama)
    return Training(run, out, replicas, threads or preflight.threads_per_replica(settings, replicas), fleet)


def resume(run: Run, *, out: Path | None = None, fleet: FleetOptions | None = None, replicas: int | None = None,
           threads: int | None = None) -> Training:
    """``run`` (:meth:`Run.load`) continued, checked to fit here first; the defaults are :func:`start`'s."""
    out = out or tuned_file(run.run_dir, run.stem)
    model = run.open_model()
    replicas = replicas or (1 if fleet else preflight.replicas(model, run.settings))
    preflight.check(model, run.settings, run.run_dir, out, fleet=fleet is not None, replicas=replicas,
                    live=run.live_path)
    return Training(run, out, replicas, threads or preflight.threads_per_replica(run.settings, replicas), fleet)


def train(training: Training, on_progress: Callable[[Progress], None] = lambda p: None,
          on_heldout: Callable[[int, HeldOut], None] = lambda t, h: None) -> Trained:
    """Train the run's remaining iterations, then export it to ``training.out``; the working copy (RAM, on
    /dev/shm) is released whatever happens: an export or a resume rebuilds it when needed."""
    run = training.run
    try:
        population = Fleet(run, training.fleet) if training.fleet else \
            LocalPopulation(run, training.replicas, training.threads)
        result = train_run(run, population, on_progress, on_heldout)
        if training.out:
            export(run, training.out)
        return result
    finally:
        with contextlib.suppress(RunInUse):  # another process's run: its copy is not ours to delete
            release(run)
