"""A run's settings: one field each, with everything else about it in the field's metadata.

A field's :class:`About` gives the option's help, the values the setting may
take, whether a resumed run may change it, and whether the tuned GGUF records
it.  The CLI's options, the checks, the resume comparison, the ``qes.*``
provenance and the fleet's copy of the settings all follow from the fields,
so adding a setting is adding a field here.

Kept free of numpy and llama.cpp so that the CLI starts at once.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import QesError
from .tasks import Task, load_task


# ---- what values a setting may take: each says what is wrong with a value, or None -------------

@dataclass(frozen=True)
class AtLeast:
    low: int

    def problem(self, value) -> str | None:
        return None if value >= self.low else f"must be at least {self.low}"


@dataclass(frozen=True)
class Positive:
    def problem(self, value) -> str | None:
        return None if value > 0 else "must be positive"


@dataclass(frozen=True)
class Within:
    """low <= value <= high, or low < value <= high when ``open_low``."""

    low: float
    high: float
    open_low: bool = False

    def problem(self, value) -> str | None:
        above = self.low < value if self.open_low else self.low <= value
        if above and value <= self.high:
            return None
        return f"must be in {'(' if self.open_low else '['}{self.low}, {self.high}]"


@dataclass(frozen=True)
class OneOf:
    choices: tuple[str, ...]

    def problem(self, value) -> str | None:
        if value in self.choices:
            return None
        return f"must be {', '.join(self.choices[:-1])} or {self.choices[-1]}"


@dataclass(frozen=True)
class MirroredPairs:
    def problem(self, value) -> str | None:
        return None if value >= 2 and value % 2 == 0 else "must be even and at least 2 (mirrored pairs)"


@dataclass(frozen=True)
class About:
    """What the CLI and a run need to know about a setting besides its default."""

    help: str  # the option's help; for a flag, what giving the flag does
    check: AtLeast | Positive | Within | OneOf | MirroredPairs | None = None  # None values are never checked
    free_on_resume: bool = False  # a resumed run may change it: it does not change the result
    recorded: bool = True  # written to the tuned GGUF as qes.<name>
    recorded_as: Callable[[Settings], Any] | None = None  # the value recorded, when not the field's own


def setting(default, help: str, **about) -> Any:
    return field(default=default, metadata={"about": About(help, **about)})


@dataclass
class Settings:
    """Everything that decides a run's result, and the few ``free_on_resume`` things that do not.

    The fields' order is the order of the CLI's options and of the ``qes.*``
    records.  ``recorded=False`` on a result-deciding setting keeps it out of
    those records, which stay the ones exports have always had: a new record
    changes every tuned file's bytes.
    """

    task: str = setting("arithmetic", "Built-in task (arithmetic, countdown, successor) or a JSONL file.")
    prompt_format: str = setting("auto", "How prompts reach the model: chat (a string prompt becomes a user turn "
                                         "in the model's chat template), raw (plain text; chat items become a "
                                         "Q:/A: transcript, few-shot for built-in tasks), or auto (chat when the "
                                         "model has a template).", check=OneOf(("auto", "chat", "raw")),
                                 recorded=False)
    reward: str | None = setting(None, "exact, contains, regex, numeric, logprob, or module:function.")
    signal: str = setting("auto", "What ranks the candidates: likelihood (the teacher-forced log-prob of each "
                                  "item's reference reply and end of turn), reward (the reward of a generated "
                                  "completion), or auto (likelihood when every training item has a reference "
                                  "reply).", check=OneOf(("auto", "likelihood", "reward")))
    iterations: int = setting(25, "Iterations to train (a resumed run may raise it).", check=AtLeast(0),
                              free_on_resume=True)
    sigma: float | None = setting(None, "Perturbation scale, in code steps (default: by the model's quant type, "
                                        "0.005, or 0.3 when most trainable codes are Q8_0).",
                                  check=Within(0, 4, open_low=True))
    alpha: float | None = setting(None, "Learning rate, in code steps (default: by the model's quant type, 0.02, "
                                        "or 1.2 when most trainable codes are Q8_0).", check=Positive())
    alpha_decay: float = setting(10.0, "Iteration t steps alpha / sqrt(1 + t / ALPHA_DECAY) (0: a constant "
                                       "alpha).", check=Within(0, 1e9))
    decay: float = setting(1.0, "Residual decay gamma (1: nothing forgotten).", check=Within(0, 1))
    population: int = setting(8, "Candidates per iteration (even: mirrored pairs).", check=MirroredPairs())
    batch: int = setting(16, "Prompts each candidate is scored on.", check=AtLeast(1))
    max_tokens: int | None = setting(None, "Generation budget (default: the task's).", check=AtLeast(1),
                                     recorded=False)
    residual: str = setting("sidecar", "Where the residual lives: a file beside the run, or rebuilt by replay.",
                            check=OneOf(("sidecar", "replay")), recorded_as=lambda s: s.residual_kind)
    window: int = setting(50, "Replay window K (iterations).", check=AtLeast(0))
    error_feedback: bool = setting(True, "Plain round(alpha*g): the paper's control.", recorded=False)
    shaping: str = setting("tscore", "How rewards become pair coefficients (see docs/how-it-works.md).",
                           check=OneOf(("tscore", "zscore", "rank")), recorded=False)
    seed: int = setting(0, "Run seed: the task's split, each iteration's prompts and perturbations.")
    heldout: int = setting(128, "Held-out items for accuracy.", check=AtLeast(1), recorded=False)
    train_embeddings: bool = setting(False, "Also train the token embedding matrix.", recorded=False)
    threads: int | None = setting(None, "llama.cpp threads per replica (default: physical cores / replicas; with "
                                        "--ray: per worker, default 1).", check=AtLeast(1), free_on_resume=True,
                                  recorded=False)
    parallel: int | None = setting(None, "Replicas scoring candidates side by side in this process, each with its "
                                         "own copy of the model in RAM (default: one per physical core, at most the "
                                         "population, while they fit in half the available RAM).",
                                   check=AtLeast(1), free_on_resume=True, recorded=False)
    eval_every: int = setting(5, "Held-out evaluation period.", check=AtLeast(1), free_on_resume=True,
                              recorded=False)
    force: bool = setting(False, "Train even when the first rewards carry no signal (all identical).",
                          free_on_resume=True, recorded=False)

    @property
    def residual_kind(self) -> str:
        """The residual store in effect: sidecar, replay, or none without error feedback."""
        return self.residual if self.error_feedback else "none"

    def check(self) -> None:
        """QesError, naming the option, for the first setting that is out of its range."""
        for name in names():
            value = getattr(self, name)
            rule = about(name).check
            problem = rule.problem(value) if rule is not None and value is not None else None
            if problem:
                raise QesError(f"{option(name)} {problem}, got {value}")
        if self.shaping == "tscore" and self.batch < 2:
            raise QesError("--shaping tscore needs --batch 2 or more (it weighs each pair by its standard error)")

    def for_codes(self, codes_by_type: dict[str, int]) -> Settings:
        """These settings with --sigma and --alpha, where not given, the defaults for the model's codes.

        ``codes_by_type``: the trainable codes per quant type name.  The type
        holding most of them decides: a Q8_0 code step is about a sixteenth
        of a 4-bit one in weight terms, so Q8_0 takes larger steps (measured
        in BENCHMARKS.md, "Q8_0's step").
        """
        most = max(codes_by_type, key=codes_by_type.get, default=None)
        sigma, alpha = STEP_DEFAULTS.get(most, STEP_DEFAULTS[None])
        return dataclasses.replace(self, sigma=sigma if self.sigma is None else self.sigma,
                                   alpha=alpha if self.alpha is None else self.alpha)

    def load_task(self) -> Task:
        """The task these settings name, with their reward, seed and held-out size; a QesError when it
        cannot give the ``--signal`` asked for."""
        task = load_task(self.task, self.reward, seed=self.seed, heldout=self.heldout)
        task.signal(self.signal)
        return task

    def resumed_with(self, given: dict[str, Any]) -> Settings:
        """These settings with ``given`` ({name: value}) applied, on a run that resumes.

        A setting that is not free on resume and differs from the run's is
        refused, in one line naming its option: it would change the result.
        """
        for name, value in given.items():
            if value != getattr(self, name) and not about(name).free_on_resume:
                raise QesError(f"{option(name)} differs from the run's ({name} = {getattr(self, name)!r}); "
                               "it would change the result — start a new run instead")
        resumed = dataclasses.replace(self, **given)
        resumed.check()
        return resumed

    def provenance(self) -> dict[str, Any]:
        """The recorded settings, in field order, as the tuned GGUF's qes.* metadata holds them."""
        records = {}
        for name in names():
            about_it = about(name)
            if about_it.recorded:
                value = about_it.recorded_as(self) if about_it.recorded_as else getattr(self, name)
                records[name] = "" if value is None else value
        return records


# (--sigma, --alpha) by the quant type that holds most of a model's trainable codes; None: every other type
STEP_DEFAULTS: dict[str | None, tuple[float, float]] = {None: (0.005, 0.02), "Q8_0": (0.3, 1.2)}


def names() -> list[str]:
    return [f.name for f in dataclasses.fields(Settings)]


def about(name: str) -> About:
    return Settings.__dataclass_fields__[name].metadata["about"]


def default(name: str) -> Any:
    return Settings.__dataclass_fields__[name].default


def value_type(name: str) -> type:
    """int, float, str or bool: the type a setting's values have when it has one (Optional unwrapped)."""
    hint = _type_hints()[name]
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


@functools.cache
def _type_hints() -> dict[str, Any]:
    return typing.get_type_hints(Settings)


def option(name: str) -> str:
    """The CLI option that gives a setting: --max-tokens; for a flag, the one that flips its default."""
    negated = value_type(name) is bool and default(name) is True
    return f"--{'no-' if negated else ''}{name.replace('_', '-')}"
