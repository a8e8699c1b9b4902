"""A task from a JSONL file: one `{"prompt": ..., "answer": ...}` or
`{"messages": [...], "answer": ...}` object per line.

Other keys are kept in `item.meta`, with the file's line number as `meta["line"]`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qes_edge.errors import QesError
from qes_edge.tasks.item import Item
from qes_edge.tasks.rewards import Exact, LogProb, Reward
from qes_edge.tasks.task import Task

ROLES = ("system", "user", "assistant")


def load_jsonl_task(path: Path, rule: Reward, seed: int, heldout: int, train_size: int | None) -> Task:
    items = read_items(path, rule)
    if not items:
        raise QesError(f"{path}: no items (empty dataset)")
    if len(items) < 2:
        raise QesError(f"{path}: has 1 item; need at least 2 (one to train on, one held out)")
    train, held = split(items, heldout, seed, train_size)
    return Task(
        name=str(path),
        train=train,
        heldout=held,
        max_tokens=generation_budget(items, rule),
        stop=(),
        rule=rule,
    )


def read_items(path: Path, rule: Reward) -> list[Item]:
    items = []
    try:
        # Bytes, decoded line by line: a text stream decodes ahead and would blame the wrong line.
        with open(path, "rb") as lines:
            for number, raw in enumerate(lines, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise QesError(f"{path} line {number}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise QesError(f"{path} line {number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                try:
                    items.append(parse_record(record, number, rule))
                except ValueError as exc:
                    raise QesError(f"{path} line {number}: {exc}") from None
    except OSError as exc:
        raise QesError(f"cannot read {path}: {exc.strerror}") from None
    return items


def parse_record(record, line: int, rule: Reward) -> Item:
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if "answer" not in record:
        raise ValueError("missing 'answer'")
    answer = record["answer"]
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"'answer' must be a string, got {type(answer).__name__}")
    answer = str(answer)
    rule.check_answer(answer)

    if "prompt" in record and "messages" in record:
        raise ValueError("has both 'prompt' and 'messages'; give one")
    if "prompt" in record:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            raise ValueError(f"'prompt' must be a string, got {type(prompt).__name__}")
    elif "messages" in record:
        prompt = parse_messages(record["messages"])
    else:
        raise ValueError("missing 'prompt' or 'messages'")

    meta = {key: value for key, value in record.items() if key not in ("prompt", "messages", "answer")}
    meta["line"] = line
    return Item(prompt=prompt, answer=answer, meta=meta, reply=answer)


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise ValueError(f"messages[{index}] must be an object with a string 'content'")
        if message.get("role") not in ROLES:
            raise ValueError(f"messages[{index}] role must be one of {', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def split(items: list[Item], heldout: int, seed: int, train_size: int | None) -> tuple[list[Item], list[Item]]:
    """Seeded split: `heldout` items held out, at most 20% of a small dataset, at least 1 each side.

    Both sides keep file order; `train_size` keeps a seeded subset of the rest.
    """
    order = list(range(len(items)))
    random.Random(f"split/{seed}").shuffle(order)
    n_held = min(heldout, max(1, round(0.2 * len(items))), len(items) - 1)
    held, rest = order[:n_held], order[n_held:]
    if train_size is not None:
        rest = rest[:train_size]
    return [items[i] for i in sorted(rest)], [items[i] for i in sorted(held)]


def generation_budget(items: list[Item], rule: Reward) -> int:
    """Default max_tokens. An exact answer never needs more tokens than characters
    (plus a few for whitespace and end of turn); other rules get room to talk."""
    if isinstance(rule, (Exact, LogProb)):
        return min(256, max(8, max(len(item.answer.strip()) for item in items) + 4))
    return 64
