"""What a user sees after a run: the reward curve and the summary."""

from __future__ import annotations

from pathlib import Path

from .metrics import Sample
from .run import RunFiles, read_metrics
from .tasks import mean_with_stderr
from .trainer import Trained


def plot_run(run_dir: Path) -> Path | None:
    """reward_curve.png: mean train reward per iteration and held-out accuracy (with SE) over iterations."""
    metrics = read_metrics(run_dir)
    steps = [m for m in metrics if m.step]
    evals = [m for m in metrics if m.heldout]
    if not steps and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, reward_axis = plt.subplots(figsize=(7, 4))
    reward_axis.plot([m.iteration for m in steps], [m.step.reward_mean for m in steps], color="tab:blue",
                     label="train reward (mean of candidates)")
    reward_axis.set_xlabel("iteration")
    reward_axis.set_ylabel("train reward", color="tab:blue")
    accuracy_axis = reward_axis.twinx()
    accuracy_axis.errorbar([m.iteration for m in evals], [m.heldout.accuracy for m in evals],
                           yerr=[m.heldout.accuracy_se for m in evals], color="tab:orange", marker="o",
                           capsize=3, label="held-out accuracy ± SE")
    accuracy_axis.set_ylabel("held-out accuracy", color="tab:orange")
    fig.legend(loc="upper center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    path = RunFiles(run_dir).reward_curve
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_lines(run_dir: Path, result: Trained, out: Path) -> list[str]:
    evals = [m for m in read_metrics(run_dir) if m.heldout]
    lines = []
    if evals:
        first, last = evals[0].heldout, evals[-1].heldout
        lines.append(f"held-out accuracy: {first.accuracy:.3f} ± {first.accuracy_se:.3f} (iteration "
                     f"{evals[0].iteration}) -> {last.accuracy:.3f} ± {last.accuracy_se:.3f} (iteration "
                     f"{evals[-1].iteration}), n={last.n}")
        lines.append(f"held-out reward:   {first.reward:.3f} ± {first.reward_se:.3f} -> "
                     f"{last.reward:.3f} ± {last.reward_se:.3f}")
        if len(evals) > 1 and first.correct is not None and last.correct is not None:
            change, change_se = mean_with_stderr(b - a for a, b in zip(first.correct, last.correct))
            significance = f", {change / change_se:+.1f} SE" if change_se > 0 else ""
            lines.append(f"change:            {change:+.3f} ± {change_se:.3f} (paired over the same "
                         f"{last.n} items{significance})")
    if len(evals) > 1 and first.samples is not None and last.samples is not None:
        lines.append(f"held-out items, iteration {evals[0].iteration} -> {evals[-1].iteration}:")
        for number, (before, after) in enumerate(zip(first.samples, last.samples), start=1):
            lines.append(_question(number, before))
            lines.append(f"     {_outcome(before)}  ->  {_outcome(after)}")
    state = "finished" if result.completed else "stopped (continue with --resume)"
    lines.append(f"{state} at iteration {result.iteration} in {result.seconds / 60:.1f} min")
    lines.append(f"tuned model: {out}")
    lines.append(f"reward curve: {RunFiles(run_dir).reward_curve}")
    return lines


def sample_lines(samples: list[Sample]) -> list[str]:
    """Two lines per held-out sample: the question, then the completion, its reward and verdict."""
    lines = []
    for number, sample in enumerate(samples, start=1):
        lines += [_question(number, sample), f"     {_outcome(sample)}"]
    return lines


def _question(number: int, sample: Sample) -> str:
    return f"  {number}. {_clipped(' '.join(sample.prompt.split()), 100)}  (answer {_clipped(repr(sample.answer), 32)})"


def _outcome(sample: Sample) -> str:
    verdict = "correct" if sample.correct else "wrong"
    return f"{_clipped(repr(sample.completion), 62)} reward {sample.reward:.3f} {verdict}"


def _clipped(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"

