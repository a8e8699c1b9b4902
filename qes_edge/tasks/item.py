"""One example of a task: a prompt, the answer it should get, and what else the task knows of it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Item:
    prompt: str | list[dict]  # plain text or chat messages; the evaluator renders them
    answer: str
    meta: dict = field(default_factory=dict)  # e.g. countdown numbers and target; JSONL line
    # The reply that earns the task's full credit, when there is one ("The answer is 21." for
    # arithmetic, a JSONL line's answer as it is): what the likelihood signal scores. load_task keeps
    # it only where the task's rule says it is correct.
    reply: str | None = None

    @property
    def question(self) -> str:
        """The prompt's last user turn (a text prompt whole): what a sample row shows."""
        if isinstance(self.prompt, str):
            return self.prompt
        return next((m["content"] for m in reversed(self.prompt) if m["role"] == "user"), "")
