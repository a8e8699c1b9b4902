"""What a fleet buys on one machine, and what it sends: `qes-edge train` with and without --ray.

    python scripts/bench_ray.py [MODEL.gguf] [--iterations 3] [--quick] [--json bench_ray.json] [--png bench_ray.png]

Four real training runs of the same settings (the defaults: population 8,
batch 16, arithmetic), each its own `python -m qes_edge train` process:
single process with 2 and with 1 llama.cpp threads, and a local Ray instance
with 1 and with 2 workers of one thread each.  Per configuration: wall time
per iteration (scoring + update, from metrics.jsonl), the start-up (process,
Ray instance, workers building their replicas, the held-out evaluations),
the bytes exchanged with the workers per iteration, and the sha256 of the
output's weights — which must be the same for all four.

Prints a table, writes --json and --png, and prints the JSON as its last line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qes_edge.model_file import open_model, weights_sha256
from qes_edge.models import default_model_path

QUICK = ["--population", "2", "--batch", "2", "--heldout", "4", "--max-tokens", "8", "--force"]  # timing, signal or not
CONFIGS = [
    ("single process, 2 threads", ["--threads", "2"]),
    ("single process, 1 thread", ["--threads", "1"]),
    ("Ray, 1 worker x 1 thread", ["--ray", "--workers", "1", "--threads", "1"]),
    ("Ray, 2 workers x 1 thread", ["--ray", "--workers", "2", "--threads", "1"]),
]


def run(model: Path, iterations: int, extra: list[str], quick: bool, run_dir: Path) -> dict:
    command = [sys.executable, "-m", "qes_edge", "train", str(model), "--iterations", str(iterations),
               "--heldout", "16", "--eval-every", str(iterations + 1), *(QUICK if quick else []), *extra,
               "--run-dir", str(run_dir), "--out", str(run_dir / "out.gguf")]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in lines if "weights" in m]
    iteration = [m["score_s"] + m["update_s"] for m in steps]
    sent = [m.get("bytes_sent") for m in steps]
    return {"iteration_s": sum(iteration) / len(iteration), "iteration_s_each": iteration,
            "setup_s": wall - sum(iteration), "wall_s": wall,
            "bytes_per_iteration": None if sent[0] is None else sum(sent) / len(sent),
            "weights_sha256": weights_sha256(open_model(run_dir / "out.gguf"))}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["configs"])
    rows = [report["configs"][n] for n in names]
    fig, axis = plt.subplots(figsize=(8, 4))
    bars = axis.bar(range(len(rows)), [r["iteration_s"] for r in rows], color=["tab:gray", "tab:gray", "tab:blue",
                                                                               "tab:blue"])
    for bar, r in zip(bars, rows):
        label = f"{r['iteration_s']:.1f} s"
        if r["bytes_per_iteration"] is not None:
            label += f"\n{r['bytes_per_iteration'] / 1000:.1f} kB sent"
        axis.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                      fontsize=8)
    axis.set_xticks(range(len(rows)), [n.replace(", ", ",\n") for n in names], fontsize=8)
    axis.set_ylabel("wall time per iteration (s)")
    axis.set_title(f"{report['iterations']} iterations, same result in every column", fontsize=9)
    axis.margins(y=0.2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=None)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 iteration of a tiny population, for regular checks")
    parser.add_argument("--json", type=Path, default=Path("bench_ray.json"))
    parser.add_argument("--png", type=Path, default=Path("bench_ray.png"))
    args = parser.parse_args()
    model = (args.model or default_model_path()).resolve()
    iterations = 1 if args.quick else args.iterations
    report = {"model": model.name, "quick": args.quick, "iterations": iterations, "configs": {}}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        for i, (name, extra) in enumerate(CONFIGS):
            report["configs"][name] = run(model, iterations, extra, args.quick, Path(tmp) / f"run{i}")
            print(f"{name}: {report['configs'][name]['iteration_s']:.2f} s/iteration", file=sys.stderr, flush=True)
    digests = {r["weights_sha256"] for r in report["configs"].values()}
    report["same_weights_everywhere"] = len(digests) == 1
    print(f"{'configuration':<28} {'s/iteration':>12} {'start-up s':>11} {'bytes/iteration':>16}")
    for name, r in report["configs"].items():
        sent = "—" if r["bytes_per_iteration"] is None else f"{r['bytes_per_iteration']:,.0f}"
        print(f"{name:<28} {r['iteration_s']:>12.2f} {r['setup_s']:>11.1f} {sent:>16}")
    print(f"same output weights in every configuration: {report['same_weights_everywhere']}")
    plot(report, args.png)
    args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
