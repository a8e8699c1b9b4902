"""Rewards and held-out accuracy of a model as it is in its file right now."""

from __future__ import annotations

from .evaluator import Evaluator
from .tasks import Item, Task, accuracy_with_stderr, mean_with_stderr
from .tasks.prompt_format import PromptFormat

SAMPLES = 3  # held-out items whose completions a held-out result keeps (the first ones: the same every time)


class Scorer:
    """A task's rewards and verdicts for the completions of an evaluator's model, its prompts in ``prompts``.

    ``signal`` is what :meth:`rewards` gives the trainer (see :meth:`Task.signal`): the task's reward of
    each greedy completion, or the likelihood of each item's reference reply.
    """

    def __init__(self, evaluator: Evaluator, task: Task, max_tokens: int, prompts: PromptFormat,
                 signal: str = "reward"):
        self.evaluator, self.task, self.max_tokens, self.prompts = evaluator, task, max_tokens, prompts
        self.stop = prompts.stop(task)
        self.signal = task.signal(signal)
        self._replies: dict[int, list[int]] = {}  # id(item) -> its reply's tokens

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

    def heldout(self, samples: int = SAMPLES) -> dict:
        """Accuracy and mean reward on the task's held-out items (see :func:`heldout_result`)."""
        return heldout_result(self.task.heldout, self.judge(self.task.heldout), samples)

    def judge(self, items: list[Item]) -> list[tuple[str, float, bool]]:
        """(completion, reward, correct) of each item."""
        completions = self.evaluator.generate([self.prompts.prompt(self.task, i) for i in items], self.max_tokens,
                                              self.stop)
        correct = [self.task.correct(c.text, i) for c, i in zip(completions, items)]
        rewards = self.rewards(items) if self.task.uses_logprob else \
            [self.task.reward(c.text, i) for c, i in zip(completions, items)]
        return [(c.text, r, bool(k)) for c, r, k in zip(completions, rewards, correct)]


def heldout_result(items: list[Item], judged: list[tuple[str, float, bool]], samples: int = SAMPLES) -> dict:
    """Accuracy and mean reward on held-out items, with their standard errors; each item's verdict and
    reward; and (question, answer, completion, reward, correct) of the first ``samples``.  ``judged``: each
    item's (completion, reward, correct), as :meth:`Scorer.judge` gives them."""
    correct = [k for _, _, k in judged]
    rewards = [r for _, r, _ in judged]
    accuracy, accuracy_se = accuracy_with_stderr(correct)
    reward, reward_se = mean_with_stderr(rewards)
    shown = [{"prompt": i.question, "answer": i.answer, "completion": c, "reward": r, "correct": k}
             for i, (c, r, k) in zip(items[:samples], judged)]
    return {"n": len(items), "accuracy": accuracy, "accuracy_se": accuracy_se,
            "reward": reward, "reward_se": reward_se, "correct": [int(k) for k in correct],
            "rewards": rewards, "samples": shown}
