"""Built-in `successor`: "What number comes right after 417? ...", answered "The number after 417 is 418".

The second task of the learning study.  The default model already answers in
the asked-for form almost every time (docs/results.md, "Successor: a skill, not a format")
but often with the wrong number — it tends to repeat the question's — so what
training gains here is a skill, not a format.  Numbers run from 10 to 999:
990 distinct questions.
"""

from __future__ import annotations

import random
import re

from qes_edge.errors import QesError
from qes_edge.tasks.item import Item
from qes_edge.tasks.rewards import Reward
from qes_edge.tasks.task import Task

FIRST, LAST = 10, 999


def ask(n: int) -> str:
    return f"What number comes right after {n}? Answer with 'The number after {n} is' and the number."


def question(n: int) -> Item:
    return Item(prompt=[{"role": "user", "content": ask(n)}], answer=str(n + 1), meta={"n": n},
                reply=f"The number after {n} is {n + 1}.")


# Worked examples for a model without a chat template (--prompt-format raw): numbers the task never asks.
EXAMPLES = tuple((ask(n), f"The number after {n} is {n + 1}.") for n in (4, 1299, 7))


def answer_form(completion: str, item: Item) -> re.Match | None:
    """The asked-for form, "The number after N is M" (final period optional), or None."""
    return re.fullmatch(rf"The number after {item.meta['n']} is (-?\d+)\.?", completion.strip())


class SuccessorReward(Reward):
    """1.0 for the asked-for form with N + 1; 0.1 for the form with another number; 0 otherwise."""

    def reward(self, completion, item):
        form = answer_form(completion, item)
        if form is None:
            return 0.0
        return 1.0 if form.group(1) == item.answer else 0.1

    def correct(self, completion, item):
        form = answer_form(completion, item)
        return form is not None and form.group(1) == item.answer


def make_task(rule: Reward | None, seed: int, heldout: int, train_size: int | None) -> Task:
    numbers = list(range(FIRST, LAST + 1))
    random.Random(f"successor/{seed}").shuffle(numbers)
    available = len(numbers) - heldout
    if available < 1 or (train_size is not None and train_size > available):
        wanted = f"{heldout} held out and {train_size or 1} to train on"
        raise QesError(f"successor has {len(numbers)} distinct questions, too few for {wanted}")
    train_size = available if train_size is None else train_size
    return Task(
        name="successor",
        train=[question(n) for n in numbers[heldout:heldout + train_size]],
        heldout=[question(n) for n in numbers[:heldout]],
        max_tokens=16,
        stop=("\n",),
        rule=rule or SuccessorReward(),
        examples=EXAMPLES,
    )
