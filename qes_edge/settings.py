"""A run's settings: what decides its result, with the defaults the CLI shows.

Kept apart from the trainer so the CLI can show the defaults without loading llama.cpp.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import QesError


@dataclass
class Settings:
    """Everything that decides a run's result (and a few things that do not: threads, eval_every, out)."""

    task: str = "arithmetic"
    reward: str | None = None
    iterations: int = 25
    population: int = 8
    batch: int = 16
    max_tokens: int | None = None
    sigma: float = 0.005
    alpha: float = 0.02
    decay: float = 0.9
    residual: str = "sidecar"
    window: int = 50
    error_feedback: bool = True
    shaping: str = "tscore"
    seed: int = 0
    heldout: int = 128
    train_embeddings: bool = False
    threads: int | None = None
    eval_every: int = 5

    # Changing any other setting on --resume would change the result.
    FREE_ON_RESUME = ("iterations", "threads", "eval_every")

    def check(self) -> None:
        if self.population < 2 or self.population % 2:
            raise QesError(f"--population must be even and at least 2 (mirrored pairs), got {self.population}")
        for name in ("iterations", "batch", "heldout", "eval_every"):
            if getattr(self, name) < (0 if name == "iterations" else 1):
                raise QesError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if not 0 < self.sigma <= 4:
            raise QesError(f"--sigma must be in (0, 4], got {self.sigma}")
        if not self.alpha > 0:
            raise QesError(f"--alpha must be positive, got {self.alpha}")
        if not 0 <= self.decay <= 1:
            raise QesError(f"--decay must be in [0, 1], got {self.decay}")
        if self.residual not in ("sidecar", "replay"):
            raise QesError(f"--residual must be sidecar or replay, got {self.residual}")
        if self.shaping not in ("tscore", "zscore", "rank"):
            raise QesError(f"--shaping must be tscore, zscore or rank, got {self.shaping}")
        if self.shaping == "tscore" and self.batch < 2:
            raise QesError("--shaping tscore needs --batch 2 or more (it weighs each pair by its standard error)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise QesError(f"--max-tokens must be at least 1, got {self.max_tokens}")
        if self.window < 0:
            raise QesError(f"--window must be >= 0, got {self.window}")

    def result_keys(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.FREE_ON_RESUME}
