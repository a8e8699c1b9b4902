"""What a run records: held-out results and the lines of metrics.jsonl, as typed records.

Each record's ``to_json`` gives the dict that is written, its keys in the
order they have always had, and ``from_json`` reads one back, so a line read
and written again is the same bytes.  A key a record leaves out (``None``) is
one that older runs did not write.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .tasks import Item, accuracy_with_stderr, mean_with_stderr

SAMPLES = 3  # held-out items whose completions a held-out result keeps (the first ones: the same every time)


@dataclass(frozen=True)
class Sample:
    """One held-out item as the model answered it."""

    prompt: str
    answer: str
    completion: str
    reward: float
    correct: bool


@dataclass(frozen=True)
class HeldOut:
    """Accuracy and mean reward on the held-out items, with their standard errors."""

    n: int
    accuracy: float
    accuracy_se: float
    reward: float
    reward_se: float
    correct: list[int] | None = None  # each item's verdict, 1 or 0
    rewards: list[float] | None = None  # each item's reward
    samples: list[Sample] | None = None  # the first items' completions

    @classmethod
    def of(cls, items: list[Item], judged: list[tuple[str, float, bool]], samples: int = SAMPLES) -> HeldOut:
        """The result on ``items``, given each one's (completion, reward, correct) as
        :meth:`qes_edge.scorer.Scorer.judge` gives them; the first ``samples`` are kept."""
        correct = [k for _, _, k in judged]
        rewards = [r for _, r, _ in judged]
        accuracy, accuracy_se = accuracy_with_stderr(correct)
        reward, reward_se = mean_with_stderr(rewards)
        shown = [Sample(i.question, i.answer, c, r, k) for i, (c, r, k) in zip(items[:samples], judged)]
        return cls(len(items), accuracy, accuracy_se, reward, reward_se, [int(k) for k in correct], rewards, shown)

    def to_json(self) -> dict:
        fields = _present(self)
        if self.samples is not None:
            fields["samples"] = [dataclasses.asdict(s) for s in self.samples]
        return fields

    @classmethod
    def from_json(cls, fields: dict) -> HeldOut:
        samples = fields.get("samples")
        return cls(**{**fields, "samples": None if samples is None else [Sample(**s) for s in samples]})


@dataclass(frozen=True)
class Step:
    """What one iteration did: its candidates' mean rewards, its update, and how long they took."""

    reward_mean: float
    reward_max: float
    rewards_plus: list[float]  # per +s candidate
    rewards_minus: list[float]
    weights: list[int]  # the pair weights of the update
    codes_stepped: int | None
    steps_blocked: int | None
    score_s: float
    update_s: float


@dataclass(frozen=True)
class FleetReport:
    """A fleet's traffic and state over one iteration (``--ray``)."""

    bytes_sent: int
    workers: int
    workers_replaced: int
    weights_sha256: str | None  # the replicas' agreed weights, first 16 hex digits


@dataclass(frozen=True)
class MetricsLine:
    """One line of metrics.jsonl: an iteration (the line of iteration 0 holds the base model's held-out result)."""

    iteration: int
    step: Step | None = None
    heldout: HeldOut | None = None
    fleet: FleetReport | None = None
    iteration_s: float | None = None

    def to_json(self) -> dict:
        fields = {"iteration": self.iteration}
        if self.step is not None:
            fields.update(dataclasses.asdict(self.step))
        if self.heldout is not None:
            fields["heldout"] = self.heldout.to_json()
        if self.fleet is not None:
            fields.update(dataclasses.asdict(self.fleet))
        if self.iteration_s is not None:
            fields["iteration_s"] = self.iteration_s
        return fields

    @classmethod
    def from_json(cls, fields: dict) -> MetricsLine:
        step = _part(Step, fields)
        heldout = HeldOut.from_json(fields["heldout"]) if "heldout" in fields else None
        return cls(fields["iteration"], step, heldout, _part(FleetReport, fields), fields.get("iteration_s"))


def _present(record) -> dict:
    return {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if getattr(record, f.name) is not None}


def _part(kind, fields: dict):
    """The ``kind`` record whose fields ``fields`` has, or None when it has none of them."""
    names = [f.name for f in dataclasses.fields(kind)]
    return kind(**{n: fields[n] for n in names}) if names[0] in fields else None
