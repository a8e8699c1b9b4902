"""QES against llama.cpp's backprop fine-tuner, on the same work: held-out accuracy against CPU-minutes.

    python scripts/build_llama_finetune.py --patched        # once: the peer, from the installed llama.cpp
    python scripts/vs_llama_finetune.py [--task arithmetic] [--lrs 1e-5,3e-5,1e-4] [--epochs 2]

Both sides start from the demo model (SmolLM2-135M-Instruct) and run on this
machine with the same threads (``--threads``, default 2), one after the other,
nothing else running:

* **QES**: ``qes-edge train`` on the Q4_1 file, in place, with its defaults
  (``--iterations 25 --eval-every 5``), the task's run seed ``--seed``.
* **llama-finetune** (the ``--patched`` build: special tokens parsed, a save and
  the process's CPU seconds after every epoch; the optimisation is stock):
  the F32 model dequantized from the same Q4_1 bytes (scripts/finetune_inputs.py
  f32), next-token loss on the SFT text of the same training split (each item's
  prompt with its reference reply as the assistant turn, through the model's own
  chat template), ``-c 256 -b 256 -ub 256`` (the context must be a multiple of
  256), AdamW at each learning rate of ``--lrs``, ``--epochs`` epochs.

Accuracy is ``qes-edge eval`` on the same held-out items, scored the same way:
QES's own held-out evaluations (what ``qes-edge eval`` of the output gives), the
peer's F32 output after each epoch, and that output re-quantized to Q4_1 by
``llama-quantize`` (what a user of the peer would ship).

**CPU-minutes** are the training process's CPU time (every thread, from its
start: imports, loading, compiling): for QES the process's CPU at each metrics
line less what its held-out evaluations took (qes_edge.phases), for the peer
``std::clock`` at the end of each epoch.  Writing the output and evaluating it
are not counted on either side.  Peak RSS and CPU totals come from ``wait4`` on
each child.  Cells are cached under ``--work``; a second run only reports.
Writes ``benchmarks/vs_llama_finetune.json`` (entries per task) and a PNG.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from finetune_inputs import restore, sft_text, to_f32  # noqa: E402

from qes_edge.models import default_model_path  # noqa: E402

TASK_FILES = ROOT / "benchmarks" / "tasks"
CHECKPOINT_LINE = re.compile(r"qes-peer: (epoch|step) (\d+) cpu_s ([0-9.]+)")
MB = 1024 * 1024


def task_spec(name: str) -> str:
    return str(TASK_FILES / f"{name}.jsonl") if (TASK_FILES / f"{name}.jsonl").is_file() else name


def run_child(command: list, log: Path) -> dict:
    """Run ``command`` with its output in ``log``; its own CPU seconds, peak RSS and wall time."""
    started = time.perf_counter()
    with open(log, "w") as out:
        child = subprocess.Popen([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        sys.exit(f"vs_llama_finetune: {Path(str(command[0])).name} failed (exit {code}); see {log}")
    return {"cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "wall_s": round(time.perf_counter() - started, 2)}


def evaluate(model: Path, task: str, seed: int, heldout: int) -> dict:
    """``qes-edge eval`` of ``model`` (its defaults): accuracy and its standard error on the held-out items."""
    out = subprocess.run([sys.executable, "-c", "from qes_edge.cli import main; main()", "eval", str(model),
                          "--task", task_spec(task), "--seed", str(seed), "--heldout", str(heldout),
                          "--json"], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"vs_llama_finetune: qes-edge eval {model.name} failed: {out.stderr.strip().splitlines()[-1:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return {"accuracy": result["accuracy"], "accuracy_se": result["accuracy_se"], "n": result["n"]}


def disk_mb(*paths: Path) -> float:
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / MB, 1)


# --- QES ---------------------------------------------------------------------------------------

def qes_child(argv: list[str]) -> None:
    """In the child: ``qes-edge train`` as the CLI runs it, stamping CPU at every metrics line."""
    from qes_edge import phases
    stamps = []

    def stamp(phase: str) -> None:
        if phase == phases.METRICS:
            stamps.append({"cpu_s": time.process_time(), "heldout_cpu_s": phases.cpu_seconds()[phases.HELDOUT],
                           "wall_s": time.perf_counter()})

    stamps_path = Path(argv.pop(0))
    phases.listeners.append(stamp)
    from qes_edge.cli import main
    sys.argv = ["qes-edge", *argv]
    try:
        main()
    except SystemExit as e:
        if e.code:
            raise
    finally:
        stamps_path.write_text(json.dumps(stamps))


def qes_arm(args, work: Path) -> dict:
    cell = work / f"qes-it{args.iterations}-every{args.eval_every}"
    result_path = cell / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    cell.mkdir(parents=True, exist_ok=True)
    run_dir, out = cell / "run", cell / "tuned.gguf"
    if run_dir.exists():
        sys.exit(f"vs_llama_finetune: {run_dir} holds an unfinished cell (its CPU times would not be one process's): "
                 f"remove {cell} and run again")
    usage = run_child([sys.executable, __file__, "_qes", cell / "stamps.json", "train", "--task", task_spec(args.task),
                       "--seed", args.seed, "--heldout", args.heldout,
                       "--iterations", args.iterations, "--eval-every", args.eval_every,
                       "--run-dir", run_dir, "--out", out], cell / "train.log")
    stamps = json.loads((cell / "stamps.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if len(lines) != len(stamps):
        sys.exit(f"vs_llama_finetune: {len(lines)} metrics lines but {len(stamps)} CPU stamps in {cell}")
    curve = []
    for line, s in zip(lines, stamps):
        if "heldout" in line:
            cpu = 0.0 if line["iteration"] == 0 else s["cpu_s"] - s["heldout_cpu_s"]
            h = line["heldout"]
            curve.append([round(cpu / 60, 3), h["accuracy"], h["accuracy_se"], line["iteration"]])
    result = {"curve": [c[:3] for c in curve], "iterations": [c[3] for c in curve],
              "peak_rss_mb": usage["peak_rss_mb"], "process_cpu_s": usage["cpu_s"], "wall_s": usage["wall_s"],
              "heldout_cpu_s": round(stamps[-1]["heldout_cpu_s"], 2),
              "output_type": "Q4_1 (the input's type; no re-quantization)", "output_mb": disk_mb(out),
              "disk_mb": disk_mb(default_model_path(), run_dir, out),
              "settings": f"qes-edge defaults (on 2 cores: 2 replicas x 1 thread), --iterations {args.iterations} "
                          f"--eval-every {args.eval_every} --seed {args.seed} --heldout {args.heldout}"}
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


# --- llama-finetune ------------------------------------------------------------------------------

def peer_inputs(args, work: Path) -> tuple[Path, Path]:
    f32 = ROOT / "build" / "finetune" / "smollm2-135m-f32.gguf"
    if not f32.is_file():
        to_f32(default_model_path(), f32)
    text = work / f"train{'-items' + str(args.sft_items) if args.sft_items else ''}.txt"
    if not text.is_file():
        work.mkdir(parents=True, exist_ok=True)
        body, n = sft_text(default_model_path(), task_spec(args.task), args.seed, args.heldout, limit=args.sft_items)
        text.write_text(body)
        print(f"{text}: {n} training items as SFT text", flush=True)
    return f32, text


def quantize(model: Path, dest: Path, bins: Path, args) -> float:
    """``llama-quantize MODEL DEST Q4_1``: the type the user started from; its CPU seconds."""
    return run_child([bins / "llama-quantize", model, dest, "Q4_1", args.threads], dest.with_suffix(".log"))["cpu_s"]


def peer_base(args, work: Path, f32: Path, bins: Path) -> dict:
    """The starting point of the peer's curves: the F32 input, and it re-quantized to Q4_1."""
    path = work / "llama-finetune-base.json"
    if not path.is_file():
        q4 = work / "base.Q4_1.gguf"
        quantize(f32, q4, bins, args)
        f, q = (evaluate(m, args.task, args.seed, args.heldout) for m in (f32, q4))
        q4.unlink()
        path.write_text(json.dumps({"f32": [0.0, f["accuracy"], f["accuracy_se"]],
                                    "requantized": [0.0, q["accuracy"], q["accuracy_se"]]}) + "\n")
    return json.loads(path.read_text())


def peer_cell(args, work: Path, lr: str, f32: Path, text: Path, bins: Path, base: dict) -> dict:
    suffix = (f"-items{args.sft_items}" if args.sft_items else "") + (f"-every{args.save_every}" if args.save_every else "")
    cell = work / f"llama-finetune-lr{lr}-e{args.epochs}{suffix}"
    result_path = cell / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    cell.mkdir(parents=True, exist_ok=True)
    out = cell / "out.gguf"
    os.environ["QES_PEER_SAVE_EVERY"] = str(args.save_every or 0)
    usage = run_child([bins / "llama-finetune-patched", "-m", f32, "-f", text, "-o", out,
                       "-c", args.ctx, "-b", args.ctx, "-ub", args.ctx, "-t", args.threads,
                       "-epochs", args.epochs, "-lr", lr], cell / "train.log")
    saves = [(kind, int(n), float(cpu)) for kind, n, cpu in CHECKPOINT_LINE.findall((cell / "train.log").read_text())]
    if [n for kind, n, _ in saves if kind == "epoch"] != list(range(1, args.epochs + 1)):
        sys.exit(f"vs_llama_finetune: {cell / 'train.log'} lacks the per-epoch lines of the patched build")
    saves.sort(key=lambda s: s[2])
    curve, requantized, quantize_cpu, points = [base["f32"]], [base["requantized"]], [], [["base", 0]]
    for kind, n, cpu in saves:
        final = kind == "epoch" and n == args.epochs
        saved = out if final else out.with_name(f"out.gguf.{kind}{n}.gguf")
        model = restore(saved, f32, cell / f"{kind}{n}.f32.gguf")
        q4 = cell / f"{kind}{n}.Q4_1.gguf"
        quantize_cpu.append(quantize(model, q4, bins, args))
        f, q = (evaluate(m, args.task, args.seed, args.heldout) for m in (model, q4))
        curve.append([round(cpu / 60, 3), f["accuracy"], f["accuracy_se"]])
        requantized.append([round(cpu / 60, 3), q["accuracy"], q["accuracy_se"]])
        points.append([kind, n])
        print(f"  lr {lr} {kind} {n}: {cpu / 60:.1f} CPU-min, F32 {f['accuracy']:.3f} ± {f['accuracy_se']:.3f}, "
              f"Q4_1 {q['accuracy']:.3f} ± {q['accuracy_se']:.3f}", flush=True)
        sizes = {"output_mb": disk_mb(model), "output_q4_1_mb": disk_mb(q4)} if final else {}
        if saved != out:
            saved.unlink()
        if not final:  # keep the last epoch's files only: 0.5 GB an F32 model
            model.unlink()
            q4.unlink()
    result = {"lr": float(lr), "epochs": args.epochs, "curve": curve, "curve_requantized": requantized,
              "points": points, "peak_rss_mb": usage["peak_rss_mb"], "process_cpu_s": usage["cpu_s"],
              "wall_s": usage["wall_s"], "requantize_cpu_s": quantize_cpu, **sizes,
              "disk_mb": round(disk_mb(default_model_path(), f32, text) + sizes["output_mb"]
                               + sizes["output_q4_1_mb"], 1),
              "output_type": "F32 (re-quantized to Q4_1 by llama-quantize to ship the input's type)",
              "settings": f"-c {args.ctx} -b {args.ctx} -ub {args.ctx} -t {args.threads} -epochs {args.epochs} "
                          f"-lr {lr} (AdamW, wd 0, validation split 0.05: stock defaults)"
                          + (f"; saved every {args.save_every} steps" if args.save_every else "")}
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def peer_items(text: Path) -> int:
    """Conversations in the SFT text (one per training item)."""
    return text.read_text().count("<|im_start|>assistant")


# --- report --------------------------------------------------------------------------------------

def plot(entry: dict, path: Path, task: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))

    def draw(curve, label, **style):
        x, y, se = zip(*curve)
        ax.errorbar(x, y, yerr=se, capsize=2, label=label, **style)

    draw(entry["qes"]["curve"], "QES, Q4_1 in place", marker="o", color="C0")
    peer = entry["llama_finetune"]
    for name, cell in peer["sweep"].items():
        best = name == peer["cell"]
        draw(cell["curve"], f"llama-finetune F32, {name}", marker="s",
             color="C1", alpha=1 if best else 0.3)
        draw(cell["curve_requantized"], f"  ... re-quantized to Q4_1, {name}",
             marker="^", linestyle="--", color="C3", alpha=1 if best else 0.3)
    ax.set_xlabel("training CPU-minutes (every thread)")
    ax.set_ylabel(f"held-out accuracy (n = {entry['n_heldout']})")
    ax.set_title(f"{task}: QES vs llama-finetune on {entry['threads']} threads")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_qes":
        return qes_child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="arithmetic", help="a built-in task or a name in benchmarks/tasks/")
    parser.add_argument("--seed", type=int, default=0, help="the run seed: the split, QES's perturbations")
    parser.add_argument("--heldout", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=25, help="QES iterations (default: qes-edge's 25)")
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--lrs", default="1e-5,3e-5,1e-4", help="llama-finetune learning rates to sweep")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--sft-items", type=int, help="the peer's text: the training split's first N items "
                        "(default: all; a large split's epoch takes hours)")
    parser.add_argument("--save-every", type=int, help="also save and score the peer every N optimizer steps "
                        "(one step: one window of --ctx tokens)")
    parser.add_argument("--ctx", type=int, default=256, help="llama-finetune's -c, -b and -ub")
    parser.add_argument("--arms", default="qes,llama-finetune")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "vs")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "vs_llama_finetune.json")
    args = parser.parse_args()
    work, arms = args.work / f"{args.task}-{args.seed}", args.arms.split(",")
    bins = ROOT / "build" / f"llama.cpp-{version('llama_cpp_python')}" / "bin"
    if "llama-finetune" in arms and not (bins / "llama-finetune-patched").is_file():
        sys.exit(f"vs_llama_finetune: {bins / 'llama-finetune-patched'} missing: "
                 "run python scripts/build_llama_finetune.py --patched")

    report = json.loads(args.json.read_text()) if args.json.is_file() else {"tasks": {}}
    entry = report["tasks"].get(args.task, {})
    entry.update({"model": default_model_path().name, "seed": args.seed, "n_heldout": args.heldout,
                  "threads": args.threads, "cpu": os.uname().machine})
    if "qes" in arms:
        entry["qes"] = qes_arm(args, work)
    if "llama-finetune" in arms:
        f32, text = peer_inputs(args, work)
        base = peer_base(args, work, f32, bins)
        for lr in args.lrs.split(","):
            peer_cell(args, work, lr, f32, text, bins, base)
        sweep = {cell.parent.name.removeprefix("llama-finetune-"): json.loads(cell.read_text())
                 for cell in sorted(work.glob("llama-finetune-*/result.json"))}  # every cell of this task so far
        # The peer's best showing: the cell and saved point of highest held-out accuracy, F32 or re-quantized,
        # chosen on the held-out items themselves (in the peer's favour).
        best = lambda c, i: max(sweep[c]["curve"][i][1], sweep[c]["curve_requantized"][i][1])  # noqa: E731
        name, at = max(((c, i) for c in sweep for i in range(1, len(sweep[c]["curve"]))), key=lambda ci: best(*ci))
        f32_name, f32_at = max(((c, i) for c in sweep for i in range(1, len(sweep[c]["curve"]))),
                               key=lambda ci: sweep[ci[0]]["curve"][ci[1]][1])
        chosen = sweep[name]
        entry["llama_finetune"] = {**chosen, "cell": name, "chosen_point": chosen["points"][at],
                                   "accuracy": chosen["curve"][at][1:],
                                   "accuracy_requantized": chosen["curve_requantized"][at][1:],
                                   "best_f32": {"cell": f32_name, "point": sweep[f32_name]["points"][f32_at],
                                                "cpu_minutes": sweep[f32_name]["curve"][f32_at][0],
                                                "accuracy": sweep[f32_name]["curve"][f32_at][1:],
                                                "accuracy_requantized": sweep[f32_name]["curve_requantized"][f32_at][1:]},
                                   "chosen_by": "highest held-out accuracy, F32 or re-quantized, over every cell and "
                                                "saved point (chosen on the held-out items: the peer's favour)",
                                   "sweep": sweep, "sft_items": peer_items(text)}
    report["tasks"][args.task] = entry
    # the first task's entry also at the top level: the keys the issue names
    first = report["tasks"].get("arithmetic", entry)
    for side in ("qes", "llama_finetune"):
        if side in first:
            report[side] = first[side]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1) + "\n")

    print(f"\n{args.task} (seed {args.seed}, held-out n = {args.heldout}, {args.threads} threads)")
    print(f"{'side':<44} {'CPU-min':>8} {'accuracy':>9} {'SE':>6}")
    for side, curve in [("QES (Q4_1)", entry.get("qes", {}).get("curve", []))] + [
            (f"llama-finetune {name} F32", c["curve"]) for name, c in entry.get("llama_finetune", {}).get("sweep", {}).items()] + [
            (f"llama-finetune {name} -> Q4_1", c["curve_requantized"]) for name, c in entry.get("llama_finetune", {}).get("sweep", {}).items()]:
        for cpu, acc, se in curve:
            print(f"{side:<44} {cpu:8.2f} {acc:9.3f} {se:6.3f}")
    for side in ("qes", "llama_finetune"):
        if side in entry:
            e = entry[side]
            print(f"{side}: peak RSS {e['peak_rss_mb']:.0f} MB, disk {e['disk_mb']:.0f} MB, output {e['output_type']}")
    if "qes" in entry and "llama_finetune" in entry:
        plot(entry, args.json.with_name(f"vs_llama_finetune-{args.task}.png"), args.task)


if __name__ == "__main__":
    main()
