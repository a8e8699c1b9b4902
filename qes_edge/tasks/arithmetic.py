"""Built-in `arithmetic`: the default demo task.

Chat prompt "What is 7 * 3? Reply with 'The answer is' and the number.";
correct means the whole stripped reply is "The answer is 21" (final period
optional).  The default model solves a minority of these greedily, so there is
room to learn both the format and the facts.  The format is the one the
default model follows most often, and the default level the one that leaves
enough distinct questions to hold 64 out and still train on 143 (docs/how-it-works.md,
"arithmetic (the default)").
"""

from __future__ import annotations

import operator
import random
import re
from dataclasses import dataclass

from qes_edge.errors import QesError
from qes_edge.tasks.item import Item
from qes_edge.tasks.rewards import Reward
from qes_edge.tasks.task import Task

INTEGER = re.compile(r"-?\d+")
STRICT = re.compile(r"The answer is (-?\d+)\.?")
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@dataclass(frozen=True)
class Level:
    """A difficulty setting: which operations, and the operand ranges (inclusive)."""

    operations: str
    left: tuple[int, int]
    right: tuple[int, int]

    def questions(self) -> list[tuple[int, str, int]]:
        """Every distinct question, in a fixed order; subtraction never goes negative."""
        return [
            (a, op, b)
            for op in self.operations
            for a in range(self.left[0], self.left[1] + 1)
            for b in range(self.right[0], self.right[1] + 1)
            if not (op == "-" and a < b)
        ]


def ask(a: int, op: str, b: int) -> str:
    return f"What is {a} {op} {b}? Reply with 'The answer is' and the number."


def question(a: int, op: str, b: int) -> Item:
    answer = str(OPERATIONS[op](a, b))
    return Item(prompt=[{"role": "user", "content": ask(a, op, b)}], answer=answer,
                meta={"a": a, "op": op, "b": b}, reply=f"The answer is {answer}.")


# The few-shot start of a plain prompt (a model without a chat template): outside the default level's questions.
EXAMPLES = tuple((ask(a, op, b), f"The answer is {OPERATIONS[op](a, b)}.") for a, op, b in
                 ((12, "+", 25), (15, "-", 7), (6, "*", 11)))


# The levels measured in docs/how-it-works.md ("arithmetic (the default)"); the task uses DEFAULT_LEVEL.
LEVELS = {
    "add 1-9": Level("+", (1, 9), (1, 9)),
    "add 1-20 + 1-9": Level("+", (1, 20), (1, 9)),
    "add/sub 1-9": Level("+-", (1, 9), (1, 9)),
    "add/sub/mul 1-9": Level("+-*", (1, 9), (1, 9)),
    "add 1-20": Level("+", (1, 20), (1, 20)),
    "add 10-99": Level("+", (10, 99), (10, 99)),
}
DEFAULT_LEVEL = "add/sub/mul 1-9"


class ArithmeticReward(Reward):
    """1.0 for exactly "The answer is N." with the right N. Partial credit keeps
    a gradient for ES: 0.3 when the right number ends a reply in another form
    (e.g. "7 + 5 = 12"), 0.1-0.2 for the strict form with a wrong number (more
    for closer), 0 otherwise."""

    def reward(self, completion, item):
        text = completion.strip()
        strict = STRICT.fullmatch(text)
        if strict and strict.group(1) == item.answer:
            return 1.0
        numbers = INTEGER.findall(text)
        # The last number, not any number: a list of guesses should not earn credit.
        if numbers and numbers[-1] == item.answer:
            return 0.3
        if strict:
            target, guess = int(item.answer), int(strict.group(1))
            closeness = max(0.0, 1.0 - abs(guess - target) / max(1, abs(target)))
            return 0.1 + 0.1 * closeness
        return 0.0

    def correct(self, completion, item):
        strict = STRICT.fullmatch(completion.strip())
        return strict is not None and strict.group(1) == item.answer


def make_task(rule: Reward | None, seed: int, heldout: int, train_size: int | None, level: str = DEFAULT_LEVEL) -> Task:
    questions = LEVELS[level].questions()
    random.Random(f"arithmetic/{level}/{seed}").shuffle(questions)
    # Held-out first, so it does not depend on how many training items are asked for.
    available = len(questions) - heldout
    if available < 1 or (train_size is not None and train_size > available):
        wanted = f"{heldout} held out and {train_size or 1} to train on"
        raise QesError(f"arithmetic has {len(questions)} distinct questions, too few for {wanted}")
    train_size = min(2000, available) if train_size is None else train_size
    return Task(
        name="arithmetic",
        train=[question(*q) for q in questions[heldout:heldout + train_size]],
        heldout=[question(*q) for q in questions[:heldout]],
        max_tokens=10,
        stop=("\n",),
        rule=rule or ArithmeticReward(),
        examples=EXAMPLES,
    )
