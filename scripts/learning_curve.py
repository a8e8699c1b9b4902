"""The long-horizon learning study: held-out gain against iterations, on the built-in and user-style tasks.

    python scripts/learning_curve.py [--tasks arithmetic,sentiment,syllables,continent] [--seeds 0,1,2]
                                     [--iterations 200] [--at 25,50,100,200] [--set NAME=VALUE ...]
                                     [--work benchmarks/learning-runs] [--no-template] [--analyse]
                                     [--json benchmarks/learning_curve.json] [--png benchmarks/learning_curve.png]

Every cell (task, seed) is ``qes-edge train`` as a user runs it, default
settings, on the default model (SmolLM2-135M-Instruct Q4_1); a task is a
built-in name or the name of a file in benchmarks/tasks (scripts/build_tasks.py
makes them).  Cells live in ``--work/<task>-<seed>``; running again with a
larger ``--iterations`` continues each one with ``--resume`` (its first
iterations are the same bytes), so a study spans sessions.  Held-out
accuracy is evaluated every 5 iterations up to 25, every 25 after.
``--no-template`` trains the demo model with its chat template removed (a
base model's file: prompts go raw, few-shot for the built-in tasks; cells
``<task>-no-template-<seed>``).  ``--analyse`` trains nothing and reports
the cells as they are.

Per task the report pools the seeds: the held-out gain over the base model
at each ``--at`` iteration every seed has reached (paired over the same
items within a seed; the pooled standard error is sqrt(sum of the seeds'
squared SEs) / seeds).  It separates form from skill on the base model and on
each seed's last iteration: the share of held-out replies in the answer's
form (for arithmetic "The answer is N", for a dataset one of its answers) and
the accuracy among those; and, for a dataset with a few labels, the base
model's own answer-likelihood choice (the label whose reply it finds most
likely), the accuracy a model that knew only the format would reach.
Prints a table per task, writes --json and --png (gain against iterations,
one curve per task).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from qes_edge.api import default_model_path, open_model, open_scorer
from qes_edge.evaluator import Evaluator
from qes_edge.run import Run, read_metrics
from qes_edge.tasks.arithmetic import STRICT
from qes_edge.tasks.prompt_format import PromptFormat

ROOT = Path(__file__).resolve().parent.parent
TASK_FILES = ROOT / "benchmarks" / "tasks"
MOST_LABELS = 10  # a dataset with at most this many distinct answers gets the likelihood-choice baseline


def qes_edge(*args: str) -> None:
    """The command as a user runs it, in a child process (its output: the cell's own log lines)."""
    subprocess.run([sys.executable, "-c", "from qes_edge.cli import main; main()", *args], check=True,
                   stdout=subprocess.DEVNULL)


def task_spec(name: str) -> str:
    return str(TASK_FILES / f"{name}.jsonl") if (TASK_FILES / f"{name}.jsonl").is_file() else name


def template_free_model(work: Path) -> Path:
    """The demo model without ``tokenizer.chat_template``: every tensor byte for byte the same."""
    from qes_edge.convert import convert_matrices

    path = work / "no-template.gguf"
    if not path.is_file():
        work.mkdir(parents=True, exist_ok=True)
        convert_matrices(default_model_path(), path, None, drop=("tokenizer.chat_template",))
    return path


def train_cell(run_dir: Path, task: str, seed: int, iterations: int, overrides: list[str],
               model: Path | None) -> None:
    """Train (or continue) one cell to ``iterations``."""
    eval_every = ["--eval-every", "5" if iterations <= 25 else "25"]
    if (run_dir / "state.json").is_file():
        command = ["train", "--resume", str(run_dir), "--iterations", str(iterations), *eval_every]
    else:
        command = ["train", *([str(model)] if model else []), "--task", task_spec(task), "--seed", str(seed),
                   "--iterations", str(iterations), "--run-dir", str(run_dir), *eval_every, *overrides]
    command += ["--out", str(run_dir / "tuned.gguf")]
    print(f"{run_dir.name}: qes-edge {' '.join(command[1:])}", flush=True)
    qes_edge(*command)


def heldout_by_iteration(run_dir: Path) -> dict[int, np.ndarray]:
    return {m.iteration: np.array(m.heldout.correct, float) for m in read_metrics(run_dir) if m.heldout}


def paired_gain(before: np.ndarray, after: np.ndarray) -> tuple[float, float]:
    differences = after - before
    return float(differences.mean()), float(differences.std(ddof=1) / math.sqrt(len(differences)))


def pooled(gains: list[tuple[float, float]]) -> tuple[float, float]:
    return (float(np.mean([g for g, _ in gains])),
            float(math.sqrt(sum(se * se for _, se in gains)) / len(gains)))


def formed(task_name: str, answers: set[str], completion: str) -> bool:
    """The reply is in the answer's form: right or wrong, the kind of answer asked for."""
    if task_name == "arithmetic":
        return STRICT.fullmatch(completion.strip()) is not None
    return completion.strip() in answers


def form_and_skill(run_dir: Path, task_name: str, iteration: int) -> dict:
    """Format rate and accuracy among well-formed replies of the model after ``iteration`` (cached)."""
    cache = run_dir / f"form-{iteration}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    run = Run.load(run_dir)
    task = run.settings.load_task()
    answers = {item.answer.strip() for item in task.train + task.heldout}
    with tempfile.TemporaryDirectory() as scratch:
        model = Path(scratch) / "model.gguf"
        qes_edge("export", str(run_dir), "--iteration", str(iteration), "--out", str(model))
        with open_scorer(model, run.settings, open_model(run.source), run.base_file, task=task) as scorer:
            evaluator, prompts = scorer.evaluator, scorer.prompts
            judged = scorer.judge(task.heldout)
            result = {"iteration": iteration, "n": len(judged)}
            shape = [formed(task_name, answers, completion) for completion, _, _ in judged]
            right = [correct for _, _, correct in judged]
            result["accuracy"] = float(np.mean(right))
            result["format_rate"] = float(np.mean(shape))
            in_form = [k for k, f in zip(right, shape) if f]
            result["formed"] = len(in_form)
            result["accuracy_formed"] = float(np.mean(in_form)) if in_form else None
            result["accuracy_formed_se"] = (float(np.std(in_form, ddof=1) / math.sqrt(len(in_form)))
                                            if len(in_form) > 1 else None)
            labels = sorted(answers)
            if task_name != "arithmetic" and len(labels) <= MOST_LABELS and iteration == 0:
                result["likelihood_choice"] = likelihood_choice(evaluator, task, prompts, labels)
    cache.write_text(json.dumps(result, indent=1))
    return result


def likelihood_choice(evaluator: Evaluator, task, prompts: PromptFormat, labels: list[str]) -> dict:
    """Accuracy of picking, for each held-out item, the label whose reply the model finds most likely
    (mean log-prob per token of the reply and end of turn, as the likelihood signal scores it)."""
    picks = []
    for item in task.heldout:
        prompt = prompts.prompt(task, item)
        replies = [evaluator.reply_tokens(prompt, prompts.reply(_with_reply(item, label))) for label in labels]
        totals = evaluator.logprob([prompt] * len(labels), replies)
        scores = [total / len(tokens) for total, tokens in zip(totals, replies)]
        picks.append(labels[int(np.argmax(scores))])
    right = [pick == item.answer.strip() for pick, item in zip(picks, task.heldout)]
    accuracy = float(np.mean(right))
    return {"accuracy": accuracy, "accuracy_se": float(np.std(right, ddof=1) / math.sqrt(len(right))),
            "picks": {label: picks.count(label) for label in labels}}


def _with_reply(item, reply: str):
    from dataclasses import replace
    return replace(item, reply=reply)


def report_task(task_name: str, cells: dict[int, Path], at: list[int]) -> dict:
    curves = {seed: heldout_by_iteration(run_dir) for seed, run_dir in cells.items()}
    reached = sorted(set.intersection(*(set(curve) for curve in curves.values())))
    listed = [t for t in reached if t in at or t == max(reached)]
    gains, gain_ses, per_seed = [], [], {}
    for t in listed:
        per = [paired_gain(curves[s][0], curves[s][t]) for s in cells]
        g, se = pooled(per)
        gains.append(round(g, 4))
        gain_ses.append(round(se, 4))
        per_seed[t] = [round(g, 4) for g, _ in per]
    base = [form_and_skill(run_dir, task_name, 0) for run_dir in cells.values()]
    last = [form_and_skill(run_dir, task_name, max(reached)) for run_dir in cells.values()]
    summary = {
        "seeds": sorted(cells), "iterations": listed, "gain": gains, "gain_se": gain_ses,
        "gain_per_seed": {str(t): v for t, v in per_seed.items()},
        "n_heldout": [int(len(curves[s][0])) for s in cells],
        # the training run's own held-out evaluations (the gains' source); the form figures below come from
        # judging the exported models again, whose batches differ: greedy replies can differ by an item or two
        "base_accuracy": round(float(np.mean([curves[s][0].mean() for s in cells])), 4),
        "accuracy_last": round(float(np.mean([curves[s][max(reached)].mean() for s in cells])), 4),
        "format_rate_before": round(float(np.mean([b["format_rate"] for b in base])), 4),
        "format_rate_after": round(float(np.mean([b["format_rate"] for b in last])), 4),
        "accuracy_formed_before": _pooled_formed(base),
        "accuracy_formed_after": _pooled_formed(last),
        "last_iteration": max(reached),
    }
    choices = [b["likelihood_choice"] for b in base if "likelihood_choice" in b]
    if choices:
        summary["likelihood_choice"] = {"accuracy": round(float(np.mean([c["accuracy"] for c in choices])), 4),
                                        "accuracy_se": round(math.sqrt(sum(c["accuracy_se"] ** 2 for c in choices))
                                                             / len(choices), 4)}
    return summary


def _pooled_formed(results: list[dict]) -> dict | None:
    """Accuracy among well-formed replies, all seeds' formed replies together."""
    right = sum(r["accuracy_formed"] * r["formed"] for r in results if r["formed"])
    count = sum(r["formed"] for r in results)
    if not count:
        return None
    accuracy = right / count
    return {"accuracy": round(accuracy, 4), "n": count,
            "accuracy_se": round(math.sqrt(accuracy * (1 - accuracy) / max(1, count - 1)), 4)}


def plot(tasks: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, summary in tasks.items():
        ax.errorbar(summary["iterations"], summary["gain"], yerr=summary["gain_se"], marker="o", capsize=3,
                    label=f"{name} ({len(summary['seeds'])} seeds)")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("symlog", linthresh=25)
    ax.set_xlabel("iterations")
    ax.set_ylabel("held-out exact accuracy gain over base")
    ax.set_title("QES on SmolLM2-135M-Instruct Q4_1, default settings")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="arithmetic,sentiment,syllables,continent")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--at", default="25,50,100,200,400")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for new cells, as qes-edge train's option (say --set alpha-decay=0)")
    parser.add_argument("--work", type=Path, default=ROOT / "benchmarks" / "learning-runs")
    parser.add_argument("--no-template", action="store_true", help="the demo model without its chat template")
    parser.add_argument("--analyse", action="store_true", help="train nothing; report the cells as they are")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "learning_curve.json")
    parser.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "learning_curve.png")
    args = parser.parse_args()
    tasks, seeds = args.tasks.split(","), [int(s) for s in args.seeds.split(",")]
    at = [int(t) for t in args.at.split(",")]
    overrides = [part for pair in args.set for part in (f"--{pair.split('=', 1)[0]}", pair.split("=", 1)[1])]
    variant = "-no-template" if args.no_template else ""
    cells = {task: {seed: args.work / f"{task}{variant}-{seed}" for seed in seeds} for task in tasks}
    model = template_free_model(args.work) if args.no_template else None
    if not args.analyse:
        for seed in seeds:  # seed-major: every task has a first seed before any has a third
            for task in tasks:
                train_cell(cells[task][seed], task, seed, args.iterations, overrides, model)
    # One JSON for every variant: a task's entry is replaced, the others kept.
    report = json.loads(args.json.read_text()) if args.json.is_file() else {"tasks": {}}
    for task in tasks:
        present = {s: d for s, d in cells[task].items() if (d / "state.json").is_file()}
        if not present:
            continue
        summary = report["tasks"][task + variant] = report_task(task, present, at)
        summary["model"] = default_model_path().name + (" without its chat template" if model else "")
        summary["settings"] = args.set or "defaults"
        print(f"\n{task}{variant}: seeds {summary['seeds']}, held-out n={summary['n_heldout']}, "
              f"base accuracy {summary['base_accuracy']:.3f}")
        print(f"  {'iteration':>9}  {'gain':>7}  {'SE':>6}  per seed")
        for t, g, se in zip(summary["iterations"], summary["gain"], summary["gain_se"]):
            print(f"  {t:>9}  {g:+7.3f}  {se:6.3f}  {summary['gain_per_seed'][str(t)]}")
        before, after = summary["accuracy_formed_before"], summary["accuracy_formed_after"]
        print(f"  in form: {summary['format_rate_before']:.3f} -> {summary['format_rate_after']:.3f}; "
              f"accuracy among them: {before and before['accuracy']} -> {after and after['accuracy']} "
              f"(n {before and before['n']} -> {after and after['n']})")
        if "likelihood_choice" in summary:
            choice = summary["likelihood_choice"]
            print(f"  base likelihood choice: {choice['accuracy']:.3f} ± {choice['accuracy_se']:.3f}")
    args.json.write_text(json.dumps(report, indent=1) + "\n")
    if report["tasks"]:
        plot(report["tasks"], args.png)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
