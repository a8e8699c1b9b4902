"""The learning study: QES against its control and full-precision ES, on two tasks and several seeds.

    python scripts/reproduce_qes.py [--quick] [--seeds 0,1,2] [--tasks arithmetic,successor]
                                    [--more-seeds TASK=SEEDS ...]
                                    [--arms qes,no-ef,fp] [--set NAME=VALUE ...]
                                    [--jobs N] [--threads N] [--work DIR] [--json F] [--png F]

Every cell (task, arm, seed) trains the default model (SmolLM2-135M-Instruct
Q4_1) with the ``Settings`` defaults — the same iterations, population,
prompts per candidate, pair seeds and prompts in every arm of a seed
(``--quick`` shrinks them) — and scores the same held-out items every
``eval_every`` iterations.  The arms:

- ``qes``: ``qes-edge train`` as a user runs it (error feedback, sidecar residual);
- ``no-ef``: the same with ``--no-error-feedback`` (plain rounding, the paper's control);
- ``fp``: ES in full precision on an F16 copy, the reference QES is measured against.

The full-precision arm is a separate, dense code path (documented here, not
in the package): the Q4_1 matrices are dequantized into an F16 GGUF that
llama.cpp memory-maps as usual; a float32 master copy of those weights is
kept in RAM and every candidate is written into the mapped F16 file in place
(so llama.cpp scores it without reloading).  Its perturbation is the
continuous twin of QES's: weight += d * sigma_dense * eps with eps ~ N(0, 1)
per weight, d the weight's Q4_1 block scale (one code step) and
sigma_dense = sqrt(sigma * sqrt(2/pi)), so each weight's perturbation has
the variance of QES's sparse one; the update is
weight += d * alpha_t/(N sigma) * sum_p c_p * sigma_dense * eps_p with the same
coefficients c_p and QES's step schedule alpha_t (``alpha_decay``) — QES's
step with its sparse delta replaced by a dense Gaussian and no rounding at
all.  At every held-out evaluation it keeps a checkpoint: the curve so far
and every iteration's coefficients (``dense/dense-state.json``, small), and
the float32 master weights as a cache (``dense/dense-state.npz``, ~0.5 GB);
a long full-precision cell resumes like a QES one, from the cache or, on
another machine, by replaying the coefficients from the base.

Per task the report pools the seeds: each arm's held-out change (after minus
before, paired over the same items) averaged over seeds, its standard error
sqrt(sum of the seeds' squared SEs) / seeds; QES's share of the
full-precision gain; error feedback minus its control, paired item by item
within a seed and pooled the same way; and the base model's rate of answers
in the asked-for form (a gain on a task the model already answers in form is
a skill, not a format).  ``--long N`` adds a QES run of N iterations (on
``--long-task``, the first seed) and reports its accuracy by 30 minutes of
training (or at its end) against its first evaluation from minute 5 on,
paired over the items.

``--more-seeds arithmetic=3,4,5`` runs those seeds on that task only (all
arms), and pools that task over its own seeds.

``--set`` changes a setting in every cell (say ``--set sigma=0.05 --set
alpha=0.1`` for another regime; give each combination its own --work), and
``--arms`` runs some of the arms only.

Cells live under --work (default: a temporary directory); re-running with
the same --work resumes unfinished cells and reuses finished ones, and
re-running with ``--set iterations=N`` continues every cell to N
iterations (their first iterations are the same bytes: nothing depends on
the total).  With
``--jobs 2 --threads 1`` two cells run side by side, one thread each.
Prints one line per cell, a table per task, writes --json (with a
``summary``) and --png (held-out accuracy against minutes of training, one
curve per arm), and prints the JSON as its last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from qes_edge.convert import convert_matrices
from qes_edge.es import iteration_batch, iteration_seeds, shape_rewards, step_size
from qes_edge import api
from qes_edge.api import Run, Settings, default_model_path, open_model, open_scorer
from qes_edge.files import atomic_output, make_working_copy
from qes_edge.run import read_metrics, write_atomically
from qes_edge.settings import about, value_type
from qes_edge.settings import names as settings_names
from qes_edge.tasks import mean_with_stderr
from qes_edge.tasks.arithmetic import STRICT
from qes_edge.tasks.successor import answer_form

QUICK = dict(iterations=2, population=2, batch=2, heldout=8, eval_every=1)
ARMS = {"qes": dict(), "no-ef": dict(error_feedback=False), "fp": None}
GAIN_KEYS = {"qes": "qes_gain", "no-ef": "no_ef_gain", "fp": "full_precision_gain"}
LABELS = {"qes": "QES (error feedback)", "no-ef": "QES, no error feedback", "fp": "ES, full precision (F16)"}
COLORS = {"qes": "tab:blue", "no-ef": "tab:gray", "fp": "tab:orange", "long": "tab:green"}
IN_FORM = {"arithmetic": lambda text, item: STRICT.fullmatch(text.strip()) is not None,
           "successor": lambda text, item: answer_form(text, item) is not None}
Q4_1_BLOCK, Q4_1_BYTES = 32, 20  # elements and bytes per Q4_1 block; its first two bytes are d (f16)
EARLY_MINUTES, LONG_MINUTES = 5.0, 30.0


def point(iteration: int, seconds: float, heldout) -> dict:
    """One held-out evaluation on the curve: when (iteration, training seconds before it) and what."""
    return {"iteration": iteration, "seconds": round(seconds, 1), "accuracy": heldout.accuracy,
            "accuracy_se": heldout.accuracy_se, "correct": heldout.correct}


def run_qes(source: Path, settings: Settings, run_dir: Path) -> dict:
    """A real `qes-edge train` run (resumed if run_dir holds one): its held-out curve.

    A resumed run takes the cell's values of every setting that is free on
    resume (iterations, eval_every, threads, ...), so a finished cell's run
    can be continued to more iterations.
    """
    if (run_dir / "state.json").exists():
        free = {name: getattr(settings, name) for name in settings_names() if about(name).free_on_resume}
        run = Run.load(run_dir, free)
    else:
        run = Run.create(run_dir, source, settings)
    api.train(api.Training(run))
    curve, seconds, stepped = [], 0.0, 0
    for m in read_metrics(run_dir):
        seconds += m.iteration_s or 0.0
        stepped += m.step.codes_stepped if m.step else 0
        if m.heldout:
            curve.append(point(m.iteration, seconds, m.heldout))
    return {"curve": curve, "codes_stepped": stepped}


class DenseES:
    """Full-precision ES on an F16 copy: float32 master weights, candidates written in place."""

    def __init__(self, source: Path, f16_path: Path, settings: Settings, work: Path):
        self.settings = settings
        self.quantized = quantized = open_model(source)
        f16 = open_model(f16_path)
        self.live = make_working_copy(f16_path, work / "f16-live.gguf")
        buf = np.memmap(self.live, dtype=np.uint8, mode="r+")
        raw = np.memmap(source, dtype=np.uint8, mode="r")
        self.views, self.master, self.scales = [], [], []
        for t in quantized.trainable:
            if t.ggml_type != 3:  # GGML_TYPE_Q4_1
                raise SystemExit(f"{t.name}: the dense baseline reads Q4_1 block scales, this is type {t.ggml_type}")
            blocks = t.n_elements // Q4_1_BLOCK
            d = raw[t.offset:t.offset + blocks * Q4_1_BYTES].reshape(blocks, Q4_1_BYTES)[:, :2]
            self.scales.append(np.ascontiguousarray(d).view(np.float16).astype(np.float32))  # [blocks, 1]
            slot = f16.tensor(t.name)
            view = buf[slot.offset:slot.offset + 2 * slot.n_elements].view(np.float16).reshape(blocks, Q4_1_BLOCK)
            self.views.append(view)
            self.master.append(view.astype(np.float32))
        self.sigma_dense = math.sqrt(settings.sigma * math.sqrt(2 / math.pi))
        self.checkpoint = work / "dense-state.npz"

    def noise(self, seed: int) -> list[np.ndarray]:
        return [np.random.Generator(np.random.PCG64([int(seed), i])).standard_normal(m.shape, dtype=np.float32)
                for i, m in enumerate(self.master)]

    def write(self, eps: list[np.ndarray] | None = None, sign: int = 1) -> None:
        """Put master (+ sign * perturbation) into the mapped F16 file llama.cpp reads."""
        for i, (view, master, d) in enumerate(zip(self.views, self.master, self.scales)):
            view[:] = master if eps is None else master + (sign * self.sigma_dense) * d * eps[i]

    def step(self, t: int, coefficients: list[float]) -> None:
        """Iteration t's update of the master weights: QES's step schedule on the dense step."""
        s = self.settings
        step = step_size(s.alpha, s.alpha_decay, t) / (s.population * s.sigma) * self.sigma_dense
        for seed, c in zip(iteration_seeds(s.seed, t, s.population // 2), coefficients):
            if c:
                for master, d, e in zip(self.master, self.scales, self.noise(seed)):
                    master += (step * c) * d * e

    def save(self, state: dict) -> None:
        """A checkpoint at a held-out evaluation: the master weights (a cache, ~0.5 GB, kept out of git)
        and the state — iteration, seconds, curve and every iteration's coefficients (small, committed)."""
        with atomic_output(self.checkpoint, f"cannot write {self.checkpoint}") as tmp, open(tmp, "wb") as f:
            np.savez(f, *self.master, iteration=state["iteration"])
        write_atomically(self.checkpoint.with_suffix(".json"), json.dumps(state).encode())

    def restore(self) -> dict | None:
        """The last checkpoint, if the cell has one: the run continues after it with the same bytes.

        The master weights come from the cache when it holds that iteration, else by replaying the
        recorded coefficients from the base (the same float32 operations in the same order).
        """
        meta = self.checkpoint.with_suffix(".json")
        if not meta.exists():
            return None
        state = json.loads(meta.read_text())
        cached = False
        if self.checkpoint.exists():
            with np.load(self.checkpoint) as saved:
                if int(saved["iteration"]) == state["iteration"]:
                    self.master, cached = [saved[f"arr_{i}"] for i in range(len(self.master))], True
        if not cached:
            for t, coefficients in enumerate(state["coefficients"]):
                self.step(t, coefficients)
        self.write()
        return state

    def train(self) -> dict:
        s = self.settings
        # the F16 file is scored as the quantized source would be: its name and chat template choose the prompts
        with open_scorer(self.live, s, self.quantized, n_seq_max=s.batch) as score:
            task = score.task
            state = self.restore() or {"iteration": 0, "seconds": 0.0, "coefficients": [],
                                       "curve": [point(0, 0.0, score.heldout())]}
            for t in range(state["iteration"], s.iterations):
                started = time.perf_counter()
                items = iteration_batch(task, s.seed, t, s.batch)
                plus, minus = [], []
                for seed in iteration_seeds(s.seed, t, s.population // 2):
                    eps = self.noise(seed)
                    self.write(eps, 1)
                    plus.append(score.rewards(items))
                    self.write(eps, -1)
                    minus.append(score.rewards(items))
                coefficients = [float(c) for c in shape_rewards(plus, minus, s.shaping)]
                self.step(t, coefficients)
                self.write()
                state["coefficients"].append(coefficients)
                state["seconds"] += time.perf_counter() - started
                if (t + 1) % s.eval_every == 0 or t + 1 == s.iterations:
                    state["curve"].append(point(t + 1, state["seconds"], score.heldout()))
                    state["iteration"] = t + 1
                    self.save(state)
        return {"curve": state["curve"]}


def f16_copy(source: Path, work: Path) -> Path:
    """The F16 GGUF the full-precision arm starts from, made once per --work."""
    path = work / "f16.gguf"
    if not path.exists():
        convert_matrices(source, path, "F16")
    return path


def run_dense(source: Path, settings: Settings, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    result = DenseES(source, f16_copy(source, work.parent.parent), settings, work).train()
    (work / "f16-live.gguf").unlink()
    return result


def base_form_rate(source: Path, settings: Settings) -> dict:
    """How often the base model answers the held-out items in the task's asked-for form."""
    settings = dataclasses.replace(settings, reward=None, max_tokens=None)  # the task's own reward and budget
    with open_scorer(source, settings, open_model(source), n_seq_max=settings.batch) as scorer:
        task = scorer.task
        completions = scorer.evaluator.generate([scorer.prompts.prompt(task, i) for i in task.heldout],
                                                task.max_tokens, scorer.stop)
    in_form = [int(IN_FORM[task.name](c.text, i)) for c, i in zip(completions, task.heldout)]
    rate, se = mean_with_stderr(in_form)
    return {"in_form": rate, "in_form_se": se, "n": len(in_form),
            "samples": [[i.prompt[-1]["content"], c.text] for c, i in list(zip(completions, task.heldout))[:3]]}


def finished(work: Path, settings: Settings) -> dict | None:
    """The cell's kept result, if it has the iterations asked for."""
    done = work / "result.json"
    result = json.loads(done.read_text()) if done.exists() else None
    return result if result and result["iterations"] == settings.iterations else None


def cell(source: Path, settings: Settings, arm: str, work: Path) -> dict:
    """One (task, arm, seed) cell, computed once: its result is kept in work/result.json.

    Asked for more iterations than its result has, a cell continues: a QES
    cell its run, the full-precision cell from its last checkpoint.
    """
    done = work / "result.json"
    result = finished(work, settings)
    if result:
        return result
    work.mkdir(parents=True, exist_ok=True)
    if arm == "fp":
        result = run_dense(source, settings, work / "dense")
    else:
        result = run_qes(source, dataclasses.replace(settings, **ARMS.get(arm) or {}), work / "run")
    result.update(task=settings.task, arm=arm, seed=settings.seed, iterations=settings.iterations)
    done.write_text(json.dumps(result))
    return result


# ---- pooling ---------------------------------------------------------------------------------------

def paired(after: list[int], before: list[int]) -> tuple[float, float]:
    return mean_with_stderr([a - b for a, b in zip(after, before)])


def pooled(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean of independent per-seed estimates and its standard error."""
    n = len(pairs)
    return sum(m for m, _ in pairs) / n, math.sqrt(sum(se * se for _, se in pairs)) / n


def by_minutes(curve: list[dict], minutes: float) -> dict:
    """The last evaluation at or before ``minutes`` of training."""
    return [p for p in curve if p["seconds"] <= minutes * 60][-1]


def from_minutes(curve: list[dict], minutes: float) -> dict:
    """The first evaluation at or after ``minutes`` of training (the last one if none is that late)."""
    return next((p for p in curve if p["seconds"] >= minutes * 60), curve[-1])


def summarize(results: dict, task: str, seeds: list[int], arms: list[str]) -> dict:
    """Pooled gains of ``arms`` (those given of qes, no-ef, fp); QES's share of fp and EF minus its
    control when both arms of the comparison ran."""
    def change(arm: str, seed: int) -> tuple[float, float]:
        curve = results[task, arm, seed]["curve"]
        return paired(curve[-1]["correct"], curve[0]["correct"])

    summary = {"seeds": seeds}
    for arm in arms:
        gain, se = pooled([change(arm, s) for s in seeds])
        summary.update({f"{GAIN_KEYS[arm]}": gain, f"{GAIN_KEYS[arm]}_se": se})
    if {"qes", "fp"} <= set(arms):
        fp = summary["full_precision_gain"]
        summary["qes_share_of_full_precision"] = summary["qes_gain"] / fp if fp else float("nan")
    if {"qes", "no-ef"} <= set(arms):
        ef = pooled([paired(results[task, "qes", s]["curve"][-1]["correct"],
                            results[task, "no-ef", s]["curve"][-1]["correct"]) for s in seeds])
        summary.update(ef_minus_control=ef[0], ef_minus_control_se=ef[1])
    summary["per_seed"] = {arm: {str(s): dict(zip(("change", "change_se"), change(arm, s))) for s in seeds}
                           for arm in arms}
    return summary


def still_learning(curve: list[dict]) -> dict:
    """The long run's accuracy by 30 minutes of training (or at its end) against from 5 minutes on.

    Both ends are taken on the conservative side of an evaluation: the first
    one at or after minute 5 (an evaluation before it would be the base model
    when evaluations are 5 minutes apart), and the last one by minute 30.
    """
    early = from_minutes(curve, EARLY_MINUTES)
    end = max(by_minutes(curve, LONG_MINUTES), early, key=lambda p: p["seconds"])  # none in between: no change
    gain, se = paired(end["correct"], early["correct"])
    return {"early_iteration": early["iteration"], "early_minutes": round(early["seconds"] / 60, 2),
            "early_accuracy": early["accuracy"], "end_iteration": end["iteration"],
            "end_minutes": round(end["seconds"] / 60, 2), "end_accuracy": end["accuracy"],
            "end_minus_early": gain, "end_minus_early_se": se}


# ---- output ----------------------------------------------------------------------------------------

def plot(report: dict, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = report["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for arm in report["arms"]:
            curves = [results[task, arm, seed]["curve"] for seed in report["seeds_by_task"][task]]
            for curve in curves:
                ax.plot([p["seconds"] / 60 for p in curve], [p["accuracy"] for p in curve], color=COLORS[arm],
                        alpha=0.3, linewidth=0.8)
            mean = [(np.mean([c[i]["seconds"] for c in curves]) / 60, np.mean([c[i]["accuracy"] for c in curves]))
                    for i in range(min(map(len, curves)))]
            ax.plot(*zip(*mean), marker="o", markersize=4, color=COLORS[arm], linewidth=2,
                    label=f"{LABELS[arm]} (mean of seeds; thin: each seed)")
        long = report.get("long")
        if long and long["task"] == task and (task, "long", long["seed"]) in results:
            curve = results[task, "long", long["seed"]]["curve"]
            ax.plot([p["seconds"] / 60 for p in curve], [p["accuracy"] for p in curve], color=COLORS["long"],
                    linewidth=1, label=f"QES, {long['iterations']} iterations (seed {long['seed']})")
        ax.set_title(f"{task}: held-out accuracy, seeds {', '.join(map(str, report['seeds_by_task'][task]))}",
                     fontsize=9)
        ax.set_xlabel("minutes of training (held-out evaluations excluded)")
        ax.set_ylabel("held-out accuracy")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("qes-edge", "llama_cpp_python", "gguf", "numpy")}


def print_tables(report: dict) -> None:
    b = report["budget"]
    print(f"\nbudget per cell: {b['iterations']} iterations x population {b['population']} x batch {b['batch']}, "
          f"sigma {b['sigma']}, alpha {b['alpha']}, decay {b['decay']}, held-out n = {b['heldout']}, "
          f"seeds {report['seeds_by_task']}")
    for task, s in report["summary"].items():
        form = report["base_in_form"][task]
        print(f"\n{task}: base model answers in the asked-for form {form['in_form']:.2f} ± {form['in_form_se']:.2f}"
              f" (n = {form['n']} x {len(s['seeds'])} seeds)")
        print(f"{'arm':<28} {'pooled change ± SE':>20}   per seed")
        for arm in report["arms"]:
            key = GAIN_KEYS[arm]
            seeds = "  ".join(f"{v['change']:+.3f}" for v in s["per_seed"][arm].values())
            print(f"{LABELS[arm]:<28} {s[key]:>+12.3f} ± {s[key + '_se']:.3f}   {seeds}")
        if "qes_share_of_full_precision" in s:
            print(f"QES / full precision: {s['qes_share_of_full_precision']:.2f}")
        if "ef_minus_control" in s:
            print(f"error feedback minus control: {s['ef_minus_control']:+.3f} ± {s['ef_minus_control_se']:.3f}")
    if "long" in report:
        x = report["long"]
        print(f"\nlong run ({x['task']}, seed {x['seed']}, {x['iterations']} iterations): "
              f"{x['early_accuracy']:.3f} at {x['early_minutes']} min (iteration {x['early_iteration']}) -> "
              f"{x['end_accuracy']:.3f} at {x['end_minutes']} min: {x['end_minus_early']:+.3f} ± "
              f"{x['end_minus_early_se']:.3f}")


def setting_value(given: str) -> tuple[str, object]:
    """"sigma=0.05" as ("sigma", 0.05), typed as the Settings field is."""
    name, _, value = given.partition("=")
    if name not in settings_names():
        raise SystemExit(f"--set {given}: no setting {name!r}")
    kind = value_type(name)
    return name, (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"tiny budget {QUICK}, for regular checks")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default="arithmetic,successor")
    parser.add_argument("--more-seeds", action="append", default=[], metavar="TASK=SEEDS",
                        help="more seeds for one task only, say arithmetic=3,4,5")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"of {', '.join(ARMS)}")
    parser.add_argument("--long", type=int, default=0, metavar="N", help="add a QES run of N iterations")
    parser.add_argument("--long-task", default=None, help="the long run's task (default: the first task)")
    parser.add_argument("--jobs", type=int, default=1, help="cells run side by side (each in its own process)")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads per cell")
    parser.add_argument("--work", type=Path, default=None, help="keep (and resume) the cells here")
    parser.add_argument("--json", type=Path, default=Path("reproduce_qes.json"))
    parser.add_argument("--png", type=Path, default=Path("reproduce_qes.png"))
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a Settings field for every cell (e.g. sigma=0.05); one --work per combination")
    parser.add_argument("--cell", nargs=3, metavar=("TASK", "ARM", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    source = default_model_path().resolve()
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks = args.tasks.split(",")
    arms = args.arms.split(",")
    if not set(arms) <= set(ARMS):
        raise SystemExit(f"--arms: each of {', '.join(ARMS)}, not {args.arms}")
    task_seeds = {task: list(seeds) for task in tasks}
    for given in args.more_seeds:
        task, _, more = given.partition("=")
        if task not in task_seeds or not more:
            raise SystemExit(f"--more-seeds {given}: TASK=SEEDS with TASK one of {', '.join(tasks)}")
        task_seeds[task] += [int(x) for x in more.split(",") if int(x) not in task_seeds[task]]
    base = Settings(threads=args.threads, **{**(QUICK if args.quick else {}), **dict(map(setting_value, args.set))})
    base.check()
    base = base.for_codes(open_model(source).codes_by_type)

    def settings_of(task: str, arm: str, seed: int) -> Settings:
        iterations = args.long if arm == "long" else base.iterations
        return dataclasses.replace(base, task=task, seed=seed, iterations=iterations)

    with tempfile.TemporaryDirectory(prefix="qes-study-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        if args.cell:  # one cell, in a process of its own (--jobs)
            task, arm, seed = args.cell
            cell(source, settings_of(task, arm, int(seed)), arm, work / f"{task}-{arm}-{seed}")
            return
        cells = [(t, a, s) for t in tasks for s in task_seeds[t] for a in arms]
        long_task = args.long_task or tasks[0]
        if args.long:
            cells.append((long_task, "long", seeds[0]))
        started = time.perf_counter()

        def compute(key: tuple) -> dict:
            task, arm, seed = key
            where = work / f"{task}-{arm}-{seed}"
            if args.jobs > 1 and not finished(where, settings_of(task, arm, seed)):
                command = [sys.executable, __file__, "--cell", task, arm, str(seed), "--work", str(work)]
                command += ["--quick"] * args.quick + (["--threads", str(args.threads)] if args.threads else [])
                command += ["--long", str(args.long)] + [f"--set={given}" for given in args.set]
                with open(work / f"{task}-{arm}-{seed}.log", "a") as log:
                    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
            result = cell(source, settings_of(task, arm, seed), arm, where)
            first, last = result["curve"][0], result["curve"][-1]
            gain, se = paired(last["correct"], first["correct"])
            print(f"{task:<11} {arm:<6} seed {seed}: {first['accuracy']:.3f} -> {last['accuracy']:.3f} "
                  f"({gain:+.3f} ± {se:.3f}) in {last['seconds'] / 60:.1f} min", flush=True)
            return result

        work.mkdir(parents=True, exist_ok=True)
        if "fp" in arms:
            f16_copy(source, work)
        with ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = dict(zip(cells, pool.map(compute, cells)))
        report = {"model": source.name, "quick": args.quick, "versions": versions(), "seeds": seeds, "tasks": tasks,
                  "seeds_by_task": task_seeds, "arms": arms,
                  "budget": {k: getattr(base, k) for k in ("iterations", "population", "batch", "heldout", "sigma",
                                                           "alpha", "decay", "shaping", "eval_every")},
                  "threads": args.threads, "jobs": args.jobs}
        report["base_in_form"] = {}
        for task in tasks:
            rates = [base_form_rate(source, settings_of(task, "qes", s)) for s in task_seeds[task]]
            rate, se = pooled([(r["in_form"], r["in_form_se"]) for r in rates])
            report["base_in_form"][task] = {"in_form": rate, "in_form_se": se, "n": rates[0]["n"],
                                            "samples": rates[0]["samples"]}
        report["summary"] = {task: summarize(results, task, task_seeds[task], arms) for task in tasks}
        if args.long:
            report["long"] = {"task": long_task, "seed": seeds[0], "iterations": args.long,
                              **still_learning(results[long_task, "long", seeds[0]]["curve"])}
        report["curves"] = {f"{t}/{a}/{s}": [{k: p[k] for k in ("iteration", "seconds", "accuracy", "accuracy_se")}
                                             for p in r["curve"]] for (t, a, s), r in results.items()}
        report["seconds"] = round(time.perf_counter() - started, 1)
        print_tables(report)
        plot(report, results, args.png)
    args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
