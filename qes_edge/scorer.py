"""Rewards and held-out accuracy of a model as it is in its file right now."""

from __future__ import annotations

from pathlib import Path

from .evaluator import Evaluator
from .metrics import SAMPLES, HeldOut
from .model_file import ModelFile
from .phases import INFERENCE, timed
from .settings import Settings
from .tasks import Item, Task
from .tasks.prompt_format import PromptFormat


class Scorer:
    """A task's rewards and verdicts for the completions of an evaluator's model, its prompts in ``prompts``.

    ``signal`` is what :meth:`rewards` gives the trainer (see :meth:`Task.signal`): the task's reward of
    each greedy completion, or the likelihood of each item's reference reply.  The scorer owns its
    evaluator: closing the scorer closes it.
    """

    def __init__(self, evaluator: Evaluator, task: Task, max_tokens: int, prompts: PromptFormat,
                 signal: str = "reward"):
        self.evaluator, self.task, self.max_tokens, self.prompts = evaluator, task, max_tokens, prompts
        self.stop = prompts.stop(task)
        self.signal = task.signal(signal)
        self._replies: dict[int, list[int]] = {}  # id(item) -> its reply's tokens

    @timed(INFERENCE)
    def rewards(self, items: list[Item]) -> list[float]:
        """One reward per item: of the greedy completion, or its reply's mean log-prob per token."""
        prompts = [self.prompts.prompt(self.task, item) for item in items]
        if self.signal == "likelihood":
            replies = [self.reply_tokens(item, prompt) for item, prompt in zip(items, prompts)]
            totals = self.evaluator.logprob(prompts, replies)
            return [total / max(1, len(tokens)) for total, tokens in zip(totals, replies)]
        completions = self.evaluator.generate(prompts, self.max_tokens, self.stop)
        return [self.task.reward(c.text, item) for c, item in zip(completions, items)]

    def reply_tokens(self, item: Item, prompt) -> list[int]:
        """The item's reference reply and the end of the turn, as tokens."""
        if id(item) not in self._replies:
            self._replies[id(item)] = self.evaluator.reply_tokens(prompt, self.prompts.reply(item))
        return self._replies[id(item)]

    def heldout(self, samples: int = SAMPLES) -> HeldOut:
        """Accuracy and mean reward on the task's held-out items."""
        return HeldOut.of(self.task.heldout, self.judge(self.task.heldout), samples)

    def judge(self, items: list[Item]) -> list[tuple[str, float, bool]]:
        """(completion, reward, correct) of each item."""
        completions = self.evaluator.generate([self.prompts.prompt(self.task, i) for i in items], self.max_tokens,
                                              self.stop)
        correct = [self.task.correct(c.text, i) for c, i in zip(completions, items)]
        rewards = self.rewards(items) if self.task.uses_logprob else \
            [self.task.reward(c.text, i) for c, i in zip(completions, items)]
        return [(c.text, r, bool(k)) for c, r, k in zip(completions, rewards, correct)]

    def close(self) -> None:
        self.evaluator.close()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_scorer(path: Path, settings: Settings, model: ModelFile, name: str | None = None, *, n_seq_max: int = 16,
                threads: int | None = None, task: Task | None = None) -> Scorer:
    """A scorer of the GGUF at ``path`` on the settings' task (or ``task``).

    ``model`` is the model as its source file describes it (``path`` may be a
    working copy of it) and ``name`` the model as the user named it (default:
    its file name): ``--prompt-format`` is chosen for them, as a run chooses
    it.  Prompts are decoded ``n_seq_max`` at a time on ``threads`` threads
    (default: ``--threads``, else the physical cores).
    """
    task = task or settings.load_task()
    prompts = PromptFormat.choose(settings.prompt_format, name or model.path.name, model.has_chat_template)
    evaluator = Evaluator(path, n_seq_max=n_seq_max, n_threads=threads or settings.threads)
    return Scorer(evaluator, task, settings.max_tokens or task.max_tokens, prompts, settings.signal)
