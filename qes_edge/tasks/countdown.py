"""Built-in `countdown`, the QES paper's task: reach a target with + - * / over
3-4 given numbers, each used at most once.

Every target is built from a random expression over all of the item's numbers,
so each item is solvable; that expression is kept as `item.answer` and in
`meta["solution"]`. Completions are parsed with `ast` and walked by hand; only
integer literals and the four binary operators are accepted, and nothing is
ever passed to `eval`.

Measured with the default SmolLM2-135M-Instruct (greedy, 48 tokens, n=20):
accuracy 0 and mean reward 0 - it never writes the tags - so countdown gives
ES no signal on that model; it is meant for 0.5B+ models, as in the paper.
"""

from __future__ import annotations

import ast
import operator
import random
from collections import Counter
from collections.abc import Callable, Hashable
from fractions import Fraction

from qes_edge.errors import QesError
from qes_edge.tasks.item import Item
from qes_edge.tasks.rewards import Reward
from qes_edge.tasks.task import Task

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
SYMBOLS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
MAX_EXPRESSION_CHARS = 200  # bounds parser nesting depth and the size of intermediate values
NUMBER_RANGE = (1, 30)
TARGET_RANGE = (1, 200)


def evaluate(expression: str) -> tuple[Fraction, list[int]]:
    """Exact value of an arithmetic expression and the integers it uses.

    Raises ValueError for anything but integer literals, + - * / and parentheses.
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, RecursionError, MemoryError) as exc:
        raise ValueError(f"not an expression: {exc}") from None
    used: list[int] = []

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Div) and right == 0:
                raise ValueError("division by zero")
            return OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"{type(node).__name__} is not allowed")

    return value(tree.body), used


def extract_answer(completion: str) -> str | None:
    """Text of the last <answer>; its closing tag may be missing because the stop string ate it."""
    start = completion.rfind("<answer>")
    if start < 0:
        return None
    body = completion[start + len("<answer>"):]
    end = body.find("</answer>")
    return body if end < 0 else body[:end]


class CountdownReward(Reward):
    """0.1 for a well-formed answer (tags, parseable, only the given numbers, each
    at most once) plus 1.0 if it equals the target exactly."""

    def reward(self, completion, item):
        expression = extract_answer(completion)
        if expression is None:
            return 0.0
        try:
            result, used = evaluate(expression)
        except ValueError:
            return 0.0
        if not Counter(used) <= Counter(item.meta["numbers"]):
            return 0.0
        return 0.1 + (1.0 if result == item.meta["target"] else 0.0)

    def correct(self, completion, item):
        return self.reward(completion, item) > 1.0


def draw(rng: random.Random) -> Item:
    """An item whose target is the value of a random expression over its numbers."""
    count = rng.choice((3, 4))  # chosen once, so dead ends do not skew items towards 3 numbers
    while True:
        numbers = [rng.randint(*NUMBER_RANGE) for _ in range(count)]
        solution = random_expression(numbers, rng)
        if solution is None:
            continue
        expression, target = solution
        # A target equal to one of the numbers is solved by copying it: too easy.
        if TARGET_RANGE[0] <= target <= TARGET_RANGE[1] and target not in numbers:
            return countdown_item(numbers, int(target), expression)


def random_expression(numbers: list[int], rng: random.Random) -> tuple[str, Fraction] | None:
    """Combine all numbers pairwise in random order; every intermediate value is a
    positive integer. None when the draw hits a dead end."""
    nodes = [(str(n), Fraction(n)) for n in numbers]
    rng.shuffle(nodes)
    while len(nodes) > 1:
        (left, a), (right, b) = nodes.pop(rng.randrange(len(nodes))), nodes.pop(rng.randrange(len(nodes)))
        symbol = rng.choice("+-*/")
        if symbol in "-/" and a < b:
            (left, a), (right, b) = (right, b), (left, a)
        result = SYMBOLS[symbol](a, b)
        if result <= 0 or result.denominator != 1:
            return None
        nodes.append((f"({left} {symbol} {right})", result))
    expression, target = nodes[0]
    return expression[1:-1], target


def ask(numbers: list[int], target: int) -> str:
    return (f"Using the numbers [{', '.join(map(str, numbers))}], create an arithmetic expression that equals "
            f"{target}. You may use +, -, *, / and each number at most once. Reply with only the expression "
            "inside <answer></answer> tags, for example <answer>(1 + 2) * 3</answer>.")


def countdown_item(numbers: list[int], target: int, solution: str) -> Item:
    return Item(prompt=[{"role": "user", "content": ask(numbers, target)}], answer=solution,
                meta={"numbers": numbers, "target": target, "solution": solution},
                reply=f"<answer>{solution}</answer>")


# The few-shot start of a plain prompt (a model without a chat template).
EXAMPLES = tuple((ask(numbers, target), f"<answer>{solution}</answer>") for numbers, target, solution in
                 (([3, 5, 2], 16, "(3 + 5) * 2"), ([4, 9, 6, 2], 30, "(9 - 4) * 6")))


def make_task(rule: Reward | None, seed: int, heldout: int, train_size: int | None) -> Task:
    rng = random.Random(f"countdown/{seed}")
    taken: set = set()

    def key(item):
        return (tuple(sorted(item.meta["numbers"])), item.meta["target"])

    held = draw_distinct(draw, key, heldout, rng, taken)
    train = draw_distinct(draw, key, 2000 if train_size is None else train_size, rng, taken)
    return Task(
        name="countdown",
        train=train,
        heldout=held,
        max_tokens=48,
        stop=("</answer>",),
        rule=rule or CountdownReward(),
        examples=EXAMPLES,
    )


def draw_distinct(
    draw: Callable[[random.Random], Item],
    key: Callable[[Item], Hashable],
    count: int,
    rng: random.Random,
    taken: set,
) -> list[Item]:
    """`count` items from `draw` whose keys are new to `taken` (which is updated)."""
    items = []
    attempts = 0
    while len(items) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise QesError(f"cannot generate {count} distinct countdown items; ask for fewer")
        item = draw(rng)
        if key(item) not in taken:
            taken.add(key(item))
            items.append(item)
    return items
