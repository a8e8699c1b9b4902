"""Does error feedback matter, as the paper claims?  QES and its controls at one equal budget.

    python scripts/reproduce_qes.py [--quick] [--threads N] [--work DIR] [--json F] [--png F]

The paper's table, small: on the built-in arithmetic task, from the default
model (SmolLM2-135M-Instruct Q4_1), each arm gets the same budget — the same
iterations, population, batch of prompts per candidate, seeds and prompts
(``qes_edge.settings.Settings`` defaults; ``--quick`` shrinks them) — and is
scored on the same held-out items before and after:

- QES, sidecar residual        (the default run)
- QES, replay residual, K = 50 (a window covering the run: must give the sidecar's bytes)
- QES, no error feedback       (plain round(alpha * g), the paper's control)
- ES, full precision on an F16 copy

The full-precision arm is a separate, dense code path (documented here, not in
the package): the Q4_1 matrices are dequantized into an F16 GGUF that
llama.cpp memory-maps as usual; a float32 master copy of those weights is kept
in RAM and every candidate is written into the mapped F16 file in place (so
llama.cpp scores it without reloading).  Its perturbation is the continuous
twin of QES's: weight += d * sigma_dense * eps with eps ~ N(0, 1) per weight
(numpy PCG64 keyed by (seed, tensor)), d the weight's Q4_1 block scale (one
code step) and sigma_dense = sqrt(sigma * sqrt(2/pi)), so each weight's
perturbation has the variance of QES's sparse stochastic-rounded one; the
update is weight += d * alpha/(N sigma) * sum_p c_p * sigma_dense * eps_p
with the same coefficients c_p (same shaping) — QES's step with delta replaced
by its dense Gaussian counterpart and no rounding at all (the float32 master
keeps every small step, the F16 copy is what llama.cpp reads).

Then the Table-2 style ablation of the replay residual over the window K and
the decay gamma, same budget.

Every run directory is kept under --work (default: a temporary directory);
re-running with the same --work resumes unfinished runs and reuses finished
ones.  Prints one line per arm as it finishes, a table, writes --json and
--png, and prints the JSON as its last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qes_edge.convert import convert_matrices
from qes_edge.evaluator import Evaluator
from qes_edge.gguf_file import default_model_path, make_working_copy, open_model, weights_sha256
from qes_edge.settings import Settings
from qes_edge.tasks import load_task, mean_with_stderr
from qes_edge.tasks.prompt_format import PromptFormat
from qes_edge.es import iteration_batch, iteration_seeds, shape_rewards
from qes_edge.replica import LocalPopulation
from qes_edge.run import Run, read_metrics
from qes_edge.scorer import Scorer
from qes_edge.trainer import train
from qes_edge.working_copy import export, release

QUICK = dict(iterations=2, population=2, batch=2, heldout=8)
WINDOWS, DECAYS = (4, 50), (0.5, 0.9)
ARMS = {
    "QES, sidecar residual": dict(residual="sidecar"),
    "QES, replay residual (K=50)": dict(residual="replay", window=50),
    "QES, no error feedback": dict(error_feedback=False),
}
DENSE_ARM = "ES, full precision (F16 copy)"
Q4_1_BLOCK, Q4_1_BYTES = 32, 20  # elements and bytes per Q4_1 block; its first two bytes are d (f16)


def outcome(before: dict, after: dict, seconds: float) -> dict:
    """Held-out accuracy after the run, and its change paired over the same items."""
    change, change_se = mean_with_stderr(b - a for a, b in zip(before["correct"], after["correct"]))
    return {"accuracy_before": before["accuracy"], "accuracy_before_se": before["accuracy_se"],
            "accuracy": after["accuracy"], "accuracy_se": after["accuracy_se"],
            "change": change, "change_se": change_se, "n": after["n"], "seconds": round(seconds, 1)}


def run_qes(source: Path, settings: Settings, run_dir: Path) -> dict:
    """A real `qes-edge train` run (resumed if run_dir holds one), exported and summarized."""
    run = Run.load(run_dir) if (run_dir / "state.json").exists() else Run.create(run_dir, source, settings)
    train(run, LocalPopulation(run))
    out = run_dir / "tuned.gguf"
    export(run, out)
    release(run)
    metrics = read_metrics(run_dir)
    evals = [m for m in metrics if "heldout" in m]
    result = outcome(evals[0]["heldout"], evals[-1]["heldout"], sum(m.get("iteration_s", 0) for m in metrics))
    result["codes_stepped"] = sum(m.get("codes_stepped", 0) for m in metrics)
    result["weights_sha256"] = weights_sha256(open_model(out))  # the export's metadata names the arm
    return result


class DenseES:
    """Full-precision ES on an F16 copy: float32 master weights, candidates written in place."""

    def __init__(self, source: Path, settings: Settings, work: Path):
        self.settings = settings
        quantized = open_model(source)
        self.prompts = PromptFormat.choose(settings.prompt_format, source.name, quantized.has_chat_template)
        f16_path = work / "f16.gguf"
        if not f16_path.exists():
            convert_matrices(source, f16_path, "F16")
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

    def noise(self, seed: int) -> list[np.ndarray]:
        return [np.random.Generator(np.random.PCG64([int(seed), i])).standard_normal(m.shape, dtype=np.float32)
                for i, m in enumerate(self.master)]

    def write(self, eps: list[np.ndarray] | None = None, sign: int = 1) -> None:
        """Put master (+ sign * perturbation) into the mapped F16 file llama.cpp reads."""
        for i, (view, master, d) in enumerate(zip(self.views, self.master, self.scales)):
            view[:] = master if eps is None else master + (sign * self.sigma_dense) * d * eps[i]

    def train(self, threads: int | None) -> dict:
        s = self.settings
        task = load_task(s.task, s.reward, seed=s.seed, heldout=s.heldout)
        pairs = s.population // 2
        step = s.alpha / (s.population * s.sigma) * self.sigma_dense
        started = time.perf_counter()
        with Evaluator(self.live, n_seq_max=s.batch, n_threads=threads) as evaluator:
            score = Scorer(evaluator, task, s.max_tokens or task.max_tokens, self.prompts)
            before = score.heldout()
            start_training = time.perf_counter()
            for t in range(s.iterations):
                seeds = iteration_seeds(s.seed, t, pairs)
                items = iteration_batch(task, s.seed, t, s.batch)
                plus, minus = [], []
                for seed in seeds:
                    eps = self.noise(seed)
                    self.write(eps, 1)
                    plus.append(score.rewards(items))
                    self.write(eps, -1)
                    minus.append(score.rewards(items))
                for seed, c in zip(seeds, shape_rewards(plus, minus, s.shaping)):
                    if c:
                        for master, d, e in zip(self.master, self.scales, self.noise(seed)):
                            master += (step * c) * d * e
                self.write()
            training = time.perf_counter() - start_training
            after = score.heldout()
        result = outcome(before, after, training)
        result["total_seconds"] = round(time.perf_counter() - started, 1)
        return result


def run_dense(source: Path, settings: Settings, work: Path, threads: int | None) -> dict:
    done = work / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    work.mkdir(parents=True, exist_ok=True)
    result = DenseES(source, settings, work).train(threads)
    (work / "f16-live.gguf").unlink()
    done.write_text(json.dumps(result))
    return result


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("qes-edge", "llama_cpp_python", "gguf", "numpy")}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    names = list(report["arms"])
    arms = [report["arms"][n] for n in names]
    left.bar(range(len(arms)), [a["accuracy"] for a in arms], yerr=[a["accuracy_se"] for a in arms], capsize=4,
             color=["tab:blue", "tab:cyan", "tab:gray", "tab:orange"][:len(arms)])
    left.axhline(arms[0]["accuracy_before"], color="black", linestyle="--", linewidth=1, label="base model (Q4_1)")
    left.set_xticks(range(len(arms)), [n.replace(", ", ",\n", 1) for n in names], fontsize=8)
    left.set_ylabel("held-out accuracy ± SE")
    left.set_title(f"equal budget: {report['budget']['iterations']} iterations × population "
                   f"{report['budget']['population']} × {report['budget']['batch']} prompts", fontsize=9)
    left.legend(fontsize=8)
    width = 0.8 / len(DECAYS)
    for j, gamma in enumerate(DECAYS):
        cells = [c for c in report["ablation"] if c["gamma"] == gamma]
        right.bar([i + j * width for i in range(len(cells))], [c["accuracy"] for c in cells], width,
                  yerr=[c["accuracy_se"] for c in cells], capsize=3, label=f"γ = {gamma}")
    right.set_xticks([i + width * (len(DECAYS) - 1) / 2 for i in range(len(WINDOWS))], [f"K = {k}" for k in WINDOWS])
    right.axhline(arms[0]["accuracy_before"], color="black", linestyle="--", linewidth=1)
    right.set_title("replay residual: window K × decay γ", fontsize=9)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=None, help="a Q4_1 GGUF (default: the default model)")
    parser.add_argument("--quick", action="store_true", help=f"tiny budget {QUICK}, for regular checks")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None, help="keep (and resume) the runs here")
    parser.add_argument("--json", type=Path, default=Path("reproduce_qes.json"))
    parser.add_argument("--png", type=Path, default=Path("reproduce_qes.png"))
    args = parser.parse_args()
    source = (args.model or default_model_path()).resolve()
    budget = Settings(threads=args.threads, **(QUICK if args.quick else {}))
    budget.eval_every = budget.iterations  # held-out accuracy before and after only: the same for every arm
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qes-reproduce-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = {"model": source.name, "quick": args.quick, "versions": versions(),
                  "budget": {k: getattr(budget, k) for k in ("iterations", "population", "batch", "heldout",
                                                             "sigma", "alpha", "decay", "shaping", "seed")},
                  "arms": {}, "ablation": []}

        def done(name: str, result: dict) -> dict:
            print(f"{name:<34} {result['accuracy']:.3f} ± {result['accuracy_se']:.3f}  change "
                  f"{result['change']:+.3f} ± {result['change_se']:.3f}  ({result['seconds']:.0f} s)", flush=True)
            return result

        for i, (name, changes) in enumerate(ARMS.items()):
            settings = dataclasses.replace(budget, **changes)
            report["arms"][name] = done(name, run_qes(source, settings, work / f"arm{i}"))
        report["arms"][DENSE_ARM] = done(DENSE_ARM, run_dense(source, budget, work / "dense", args.threads))
        for window in WINDOWS:
            for gamma in DECAYS:
                settings = dataclasses.replace(budget, residual="replay", window=window, decay=gamma)
                if (window, gamma) == (50, budget.decay):
                    result = report["arms"]["QES, replay residual (K=50)"]
                else:
                    result = done(f"replay K={window} γ={gamma}", run_qes(source, settings, work / f"K{window}-g{gamma}"))
                report["ablation"].append({"window": window, "gamma": gamma, **result})
    sidecar, replay = report["arms"]["QES, sidecar residual"], report["arms"]["QES, replay residual (K=50)"]
    report["replay_k50_equals_sidecar"] = sidecar["weights_sha256"] == replay["weights_sha256"]
    report["seconds"] = round(time.perf_counter() - started, 1)

    b = report["budget"]
    print(f"\nequal budget: {b['iterations']} iterations, population {b['population']}, batch {b['batch']}, "
          f"sigma {b['sigma']}, alpha {b['alpha']}, held-out n = {b['heldout']}")
    print(f"{'arm':<34} {'before':>7} {'after ± SE':>15} {'paired change ± SE':>20} {'train s':>8}")
    for name, r in report["arms"].items():
        print(f"{name:<34} {r['accuracy_before']:>7.3f} {r['accuracy']:>8.3f} ± {r['accuracy_se']:.3f} "
              f"{r['change']:>+12.3f} ± {r['change_se']:.3f} {r['seconds']:>8.0f}")
    print(f"replay (K=50) gives the sidecar's weights, byte for byte: {report['replay_k50_equals_sidecar']}")
    print(f"\n{'replay K':>8} {'γ':>5} {'after ± SE':>15} {'paired change ± SE':>20}")
    for c in report["ablation"]:
        print(f"{c['window']:>8} {c['gamma']:>5} {c['accuracy']:>8.3f} ± {c['accuracy_se']:.3f} "
              f"{c['change']:>+12.3f} ± {c['change_se']:.3f}")
    print(f"total {report['seconds']:.0f} s")
    plot(report, args.png)
    args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
