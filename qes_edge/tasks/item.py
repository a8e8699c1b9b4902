"""One example of a task: a prompt, the answer it should get, and what else the task knows of it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Item:
    prompt: str | list[dict]  # plain text or chat messages; the evaluator renders them
    answer: str
    meta: dict = field(default_factory=dict)  # e.g. countdown numbers and target; JSONL line
