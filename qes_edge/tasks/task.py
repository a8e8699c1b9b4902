"""What the trainer sees of a task: items to sample from, and how to score completions."""

from __future__ import annotations

from dataclasses import dataclass

from qes_edge.errors import QesError
from qes_edge.tasks.item import Item
from qes_edge.tasks.rewards import Reward, RewardFunctionError


@dataclass(frozen=True)
class Task:
    name: str
    train: list[Item]  # the ES loop samples its batches from these
    heldout: list[Item]  # fixed, never trained on
    max_tokens: int  # default generation budget
    stop: tuple[str, ...]
    rule: Reward
    # Worked (question, reply) pairs: the few-shot start of a plain prompt for a model
    # without a chat template (--prompt-format raw; see prompt_format.py).
    examples: tuple[tuple[str, str], ...] = ()

    @property
    def uses_logprob(self) -> bool:
        """True: the reward is the teacher-forced mean per-token log-prob of item.answer,
        computed by the trainer; `reward()` is not called on generated text."""
        return self.rule.uses_logprob

    def signal(self, setting: str) -> str:
        """What ranks the candidates under ``--signal setting``: ``likelihood`` (of each item's reference
        reply, teacher-forced) or ``reward`` (of a generated completion).  ``auto``: the likelihood when
        every training item has a reply, which gives candidates a difference from the first iteration
        even where no candidate writes an answer the reward credits."""
        if self.uses_logprob:
            return "likelihood"
        missing = next((item for item in self.train if item.reply is None), None)
        if setting == "likelihood" and missing is not None:
            raise QesError(f"--signal likelihood needs a reference reply for every item; {self.locate(missing)} has "
                           f"none (its answer {missing.answer!r} does not earn the reward's full credit as it is)")
        if setting == "auto":
            return "reward" if missing is not None else "likelihood"
        return setting

    def reward(self, completion: str, item: Item) -> float:
        """Shaped training reward."""
        try:
            return self.rule.reward(completion, item)
        except RewardFunctionError as exc:
            raise RewardFunctionError(f"{exc} on {self.locate(item)}") from exc.__cause__

    def correct(self, completion: str, item: Item) -> bool:
        """Verdict for held-out accuracy."""
        try:
            return self.rule.correct(completion, item)
        except RewardFunctionError as exc:
            raise RewardFunctionError(f"{exc} on {self.locate(item)}") from exc.__cause__

    def locate(self, item: Item) -> str:
        """Where an item sits, for error messages: 'train item 17 (data.jsonl line 23)'."""
        where = "item not in this task"
        for split, items in (("train", self.train), ("held-out", self.heldout)):
            index = next((i for i, candidate in enumerate(items) if candidate is item), None)
            if index is not None:
                where = f"{split} item {index}"
                break
        if "line" in item.meta:
            where += f" ({self.name} line {item.meta['line']})"
        return where

