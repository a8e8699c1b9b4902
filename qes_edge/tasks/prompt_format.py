"""How a task's items reach the model: turns through its chat template, or plain text.

``--prompt-format``:

- ``chat``: a string prompt becomes one user turn; chat messages go through
  the model's chat template (with the generation prompt appended);
- ``raw``: a string prompt is sent as it is; chat messages become a plain
  transcript (``Q: ...`` / ``A: ...`` lines ending in ``A:``), preceded by the
  task's worked examples when it has some (the built-in tasks do: a few-shot
  prompt a base model continues), and generation also stops at a new ``Q:``
  line;
- ``auto`` (the default): chat when the model has a chat template, raw
  otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from qes_edge.errors import QesError
from qes_edge.tasks.item import Item
from qes_edge.tasks.task import Task

NEXT_QUESTION = "\nQ:"  # where a plain transcript's answer ends


@dataclass(frozen=True)
class PromptFormat:
    """The prompt format in effect for one model: chat turns (``chat``) or plain text."""

    chat: bool

    @classmethod
    def choose(cls, setting: str, model_name: str, has_chat_template: bool) -> PromptFormat:
        """The format ``--prompt-format setting`` (auto, chat or raw) means for a model; the error names it."""
        if setting == "chat" and not has_chat_template:
            raise QesError(f"{model_name} has no chat template: use --prompt-format raw (or auto)")
        return cls(chat=setting == "chat" or (setting == "auto" and has_chat_template))

    def prompt(self, task: Task, item: Item) -> str | list[dict]:
        """What the evaluator gets for ``item``: chat messages, or the plain text to continue."""
        if self.chat:
            return [{"role": "user", "content": item.prompt}] if isinstance(item.prompt, str) else item.prompt
        if isinstance(item.prompt, str):
            return item.prompt
        return transcript(task.examples, item.prompt)

    def reply(self, item: Item) -> str:
        """The item's reference reply as the model continues this format's prompt: a transcript's
        answer follows "A:" after a space and ends its line."""
        if self.chat or isinstance(item.prompt, str):
            return item.reply
        return f" {item.reply}\n"

    def stop(self, task: Task) -> tuple[str, ...]:
        """The task's stop strings, and the start of the next question when a transcript is continued."""
        if self.chat or all(isinstance(item.prompt, str) for item in (*task.train, *task.heldout)):
            return task.stop
        return (*task.stop, NEXT_QUESTION)


def transcript(examples: tuple[tuple[str, str], ...], messages: list[dict]) -> str:
    """Chat messages as plain text: system text first, then the worked examples and the turns as Q:/A: lines."""
    text = "".join(f"{m['content']}\n\n" for m in messages if m["role"] == "system")
    for question, reply in examples:
        text += f"Q: {question}\nA: {reply}\n\n"
    for m in messages:
        if m["role"] == "user":
            text += f"Q: {m['content']}\n"
        elif m["role"] == "assistant":
            text += f"A: {m['content']}\n\n"
    return text + "A:"
