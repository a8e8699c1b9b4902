"""Reward rules: how a completion is scored against an item's answer.

A rule gives two things: a shaped training reward (float) and a correct /
incorrect verdict for held-out accuracy. Rules a user can pick by name
(`--reward exact`) register themselves with a class keyword; tasks with their
own shaping (arithmetic, countdown) subclass `Reward` without one.

A user rule is `module.path:function` or `file.py:function`, a function
`(completion: str, item: Item) -> float`; a completion counts as correct when
it scores at least 1.0, the full-credit value every built-in rule uses.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import numbers
import os
import re
import sys
from pathlib import Path
from typing import Callable, ClassVar

from qes_edge.errors import QesError
from qes_edge.tasks.item import Item


class RewardFunctionError(QesError):
    """A user reward function raised or returned something that is not a finite number."""


class Reward:
    """Base rule. Subclass with `name="..."` to make the rule selectable by name."""

    by_name: ClassVar[dict[str, type[Reward]]] = {}
    name: ClassVar[str] = ""
    uses_logprob: ClassVar[bool] = False

    def __init_subclass__(cls, name: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if name is not None:
            cls.name = name
            Reward.by_name[name] = cls

    def reward(self, completion: str, item: Item) -> float:
        return 1.0 if self.correct(completion, item) else 0.0

    def correct(self, completion: str, item: Item) -> bool:
        raise NotImplementedError

    def check_answer(self, answer: str) -> None:
        """Raise ValueError if `answer` cannot be used by this rule (checked at load time)."""


class Exact(Reward, name="exact"):
    """The stripped completion equals the stripped answer."""

    def correct(self, completion, item):
        return completion.strip() == item.answer.strip()


class Contains(Reward, name="contains"):
    """The stripped answer occurs in the completion (case-sensitive)."""

    def correct(self, completion, item):
        return item.answer.strip() in completion

    def check_answer(self, answer):
        if not answer.strip():
            raise ValueError("empty answer would match every completion")


@functools.lru_cache(maxsize=None)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


class Regex(Reward, name="regex"):
    """The answer is a regular expression that `re.search` finds in the completion."""

    def correct(self, completion, item):
        return _compiled(item.answer).search(completion) is not None

    def check_answer(self, answer):
        try:
            _compiled(answer)
        except re.error as exc:
            raise ValueError(f"answer is not a valid regex: {exc}") from exc


# "1,234" is one number (thousands separators), "1, 2" is two.
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")


def first_number(text: str) -> float | None:
    match = NUMBER.search(text)
    return float(match.group().replace(",", "")) if match else None


class Numeric(Reward, name="numeric"):
    """The first number in the completion equals the answer within 1e-6 relative."""

    def correct(self, completion, item):
        value = first_number(completion)
        return value is not None and math.isclose(value, float(item.answer.replace(",", "")), rel_tol=1e-6)

    def check_answer(self, answer):
        try:
            float(answer.replace(",", ""))
        except ValueError:
            raise ValueError(f"answer {answer!r} is not a number") from None


class LogProb(Reward, name="logprob"):
    """Reward = mean per-token log-prob of item.answer given the prompt, teacher-forced.

    The trainer computes it with the evaluator's log-prob scoring; no text is
    generated for training, so `reward()` is never called. Held-out accuracy
    still generates and counts an exact (stripped) match as correct.
    """

    uses_logprob = True

    def reward(self, completion, item):
        raise TypeError("log-prob rewards are scored by the trainer from item.answer, not from generated text")

    def correct(self, completion, item):
        return completion.strip() == item.answer.strip()


class UserReward(Reward):
    """A user's `(completion, item) -> float`, checked to return a finite number."""

    def __init__(self, spec: str, function: Callable[[str, Item], float]):
        self.spec = spec
        self.function = function

    def reward(self, completion, item):
        try:
            value = self.function(completion, item)
        except Exception as exc:
            raise RewardFunctionError(f"reward function {self.spec} raised {type(exc).__name__}: {_one_line(exc)}") from exc
        if isinstance(value, bool):
            value = float(value)
        if not isinstance(value, numbers.Real):
            raise RewardFunctionError(f"reward function {self.spec} returned {type(value).__name__} {_short(value)}, not a number")
        value = float(value)
        if not math.isfinite(value):
            raise RewardFunctionError(f"reward function {self.spec} returned {value}, not a finite number")
        return value

    def correct(self, completion, item):
        return self.reward(completion, item) >= 1.0


def reward_names() -> list[str]:
    return sorted(Reward.by_name)


def parse_reward(spec: str) -> Reward:
    """A rule from its name or a `module.path:function` / `file.py:function` spec."""
    if spec in Reward.by_name:
        return Reward.by_name[spec]()
    if ":" in spec:
        return UserReward(spec, _import_function(spec))
    raise QesError(f"unknown reward '{spec}': use one of {', '.join(reward_names())} or module.path:function")


def _import_function(spec: str) -> Callable:
    module_name, _, function_name = spec.rpartition(":")
    if not module_name or not function_name.isidentifier():
        raise QesError(f"bad reward function '{spec}': expected module.path:function")
    # Like `python -m`, modules in the working directory come first.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = _import_module(module_name)
    except QesError:
        raise
    except BaseException as exc:  # SystemExit from a user module is still an import failure
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise QesError(f"cannot import reward module '{module_name}': {type(exc).__name__}: {_one_line(exc)}") from exc
    function = getattr(module, function_name, None)
    if function is None:
        raise QesError(f"reward module '{module_name}' has no function '{function_name}'")
    if not callable(function):
        raise QesError(f"reward '{spec}' is a {type(function).__name__}, not a function")
    return function


def _import_module(module_name: str):
    if not module_name.endswith(".py"):
        return importlib.import_module(module_name)
    path = Path(module_name)
    if not path.is_file():
        raise QesError(f"reward file '{module_name}' does not exist")
    module_spec = importlib.util.spec_from_file_location(f"qes_user_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
