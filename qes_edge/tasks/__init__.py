"""Tasks: the items the ES loop trains on and holds out, and how completions are scored.

    task = load_task("arithmetic", seed=0)
    task = load_task("data.jsonl", reward="numeric")
    task = load_task("data.jsonl", reward="my_rewards:score")   # (completion, item) -> float
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from qes_edge.errors import QesError
from qes_edge.tasks import arithmetic, countdown, successor
from qes_edge.tasks.item import Item
from qes_edge.tasks.jsonl import load_jsonl_task
from qes_edge.tasks.rewards import Exact, Reward, RewardFunctionError, parse_reward, reward_names
from qes_edge.tasks.stats import accuracy_with_stderr, mean_with_stderr
from qes_edge.tasks.task import Task

BUILTIN_TASKS = {"arithmetic": arithmetic.make_task, "countdown": countdown.make_task, "successor": successor.make_task}

__all__ = [
    "BUILTIN_TASKS", "Item", "Reward", "RewardFunctionError", "Task",
    "accuracy_with_stderr", "load_task", "mean_with_stderr", "reward_names",
]


def load_task(
    spec: str,
    reward: str | None = None,
    seed: int = 0,
    heldout: int = 64,
    train_size: int | None = None,
) -> Task:
    """A built-in task by name, or a JSONL dataset by path.

    `reward` picks the rule (exact, contains, regex, numeric, logprob, or
    module.path:function); built-ins default to their own shaped reward, JSONL to
    `exact`. The same seed gives the same items and the same split.
    """
    if heldout < 1:
        raise QesError(f"held-out size must be at least 1, got {heldout}")
    if train_size is not None and train_size < 1:
        raise QesError(f"train size must be at least 1, got {train_size}")
    rule = parse_reward(reward) if reward is not None else None
    if spec in BUILTIN_TASKS:
        return with_checked_replies(BUILTIN_TASKS[spec](rule=rule, seed=seed, heldout=heldout, train_size=train_size))
    path = Path(spec)
    if path.is_file():
        return with_checked_replies(load_jsonl_task(path, rule or Exact(), seed, heldout, train_size))
    raise QesError(f"unknown task '{spec}': not a file, nor a built-in ({', '.join(BUILTIN_TASKS)})")


def with_checked_replies(task: Task) -> Task:
    """``task`` with each item's reference reply kept only where the task's own rule calls it correct:
    a reward that wants another form (a user's function on a built-in task, say) gets no reply to train
    towards that it would not credit."""
    def checked(item: Item) -> Item:
        return item if item.reply is None or task.correct(item.reply, item) else replace(item, reply=None)
    return replace(task, train=[checked(i) for i in task.train], heldout=[checked(i) for i in task.heldout])
