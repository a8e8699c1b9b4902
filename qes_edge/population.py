"""What the ES loop (:func:`qes_edge.trainer.train`) asks of the candidates' scorers: a population.

Two kinds: :class:`qes_edge.replica.LocalPopulation`, replicas of the run in
this process, and :class:`qes_edge.fleet.Fleet`, replicas on Ray workers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, ContextManager, Optional

import numpy as np

from .metrics import FleetReport, HeldOut


def candidates_left(seeds: np.ndarray, scored: dict) -> list[tuple[int, int]]:
    """The iteration's candidates (pair, sign), mirrored pairs in order, but those already ``scored``."""
    return [(p, sign) for p in range(len(seeds)) for sign in (1, -1) if (p, sign) not in scored]


class Population(ABC):
    """Replicas of a run at its checkpoint that score candidates and take updates.

    ``with population:`` its replicas are open at the run's checkpoint, and closed after.
    """

    @abstractmethod
    def __enter__(self) -> Population: ...

    @abstractmethod
    def __exit__(self, *exc) -> None: ...

    @abstractmethod
    def score(self, seeds: np.ndarray, iteration: int, stop, scored: dict,
              on_scored: Callable[[tuple, list], None]) -> Optional[dict]:
        """{(pair, sign): per-prompt rewards} of the iteration's candidates, or None when ``stop.requested``
        cut the iteration short.  Either way every replica is at the checkpoint again after.

        ``scored``: candidates already scored (by a run stopped in this iteration), not scored again;
        ``on_scored(candidate, rewards)`` is called as each other one is, from any thread."""

    @abstractmethod
    def updated(self, history: list) -> ContextManager[tuple]:
        """``with population.updated(history) as (stepped, blocked):`` the last row of ``history`` applied to
        every replica: (codes stepped, steps blocked).  The replicas are then ahead of the run's checkpoint,
        which the block writes."""

    @abstractmethod
    def heldout(self, on_judged: Callable[[int, int], None] = lambda done, total: None) -> HeldOut:
        """Held-out accuracy and reward of the replicas' model; ``on_judged(done, total)`` as groups of items
        are judged (a fleet judges them on one worker, and says nothing until it is done)."""

    def report(self) -> Optional[FleetReport]:
        """What the metrics line records about the population itself; a population in this process has nothing."""
        return None

