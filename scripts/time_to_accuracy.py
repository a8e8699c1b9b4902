"""Held-out accuracy against wall-clock minutes: the default run on one replica and on the default replicas.

    python scripts/time_to_accuracy.py [--iterations 25] [--quick] [--json F] [--png F]

Two runs of the bare ``qes-edge train`` (the default model, task and
settings) one after the other on this machine: one replica with all the
physical cores' threads (the path before ``--parallel``), then the default
(``qes_edge.preflight.replicas``).  Each point is a held-out evaluation, at
the wall-clock time since the run started (working copy, model load,
evaluations and all).  Both runs must end in the same bytes.

Prints a table, writes JSON and a PNG, and prints the JSON as its last line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

from qes_edge import api, preflight
from qes_edge.api import Settings, default_model_path, open_model
from qes_edge.cpu import physical_cores
from qes_edge.files import file_sha256


def timed_run(source: Path, settings: Settings, replicas: int, threads: int) -> dict:
    points = []
    with tempfile.TemporaryDirectory(prefix="time-to-accuracy-") as tmp:
        started = time.perf_counter()
        training = api.start(source, settings, run_dir=Path(tmp) / "run", out=Path(tmp) / "tuned.gguf",
                             replicas=replicas, threads=threads)

        def on_heldout(iteration: int, result) -> None:
            points.append({"iteration": iteration, "minutes": round((time.perf_counter() - started) / 60, 2),
                           "accuracy": result.accuracy, "accuracy_se": result.accuracy_se})

        api.train(training, on_heldout=on_heldout)
        minutes = (time.perf_counter() - started) / 60  # the export included
        digest = file_sha256(training.out)
    return {"replicas": replicas, "threads": threads, "minutes": round(minutes, 2), "points": points,
            "tuned_sha256": digest}


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, r in runs.items():
        ax.errorbar([p["minutes"] for p in r["points"]], [p["accuracy"] for p in r["points"]],
                    yerr=[p["accuracy_se"] for p in r["points"]], marker="o", markersize=4, capsize=2,
                    label=f"{label}: {r['replicas']} replica(s) x {r['threads']} thread(s), {r['minutes']:.1f} min")
    ax.set_xlabel("wall-clock minutes since the run started")
    ax.set_ylabel("held-out accuracy (n = 128, ± SE)")
    ax.set_title("the default run (arithmetic): time to accuracy", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=Settings().iterations)
    parser.add_argument("--quick", action="store_true", help="2 iterations, batch 4, held-out 16: a check of the script")
    parser.add_argument("--json", type=Path, default=Path("time_to_accuracy.json"))
    parser.add_argument("--png", type=Path, default=Path("time_to_accuracy.png"))
    args = parser.parse_args()
    source = default_model_path()
    settings = dataclasses.replace(Settings(), iterations=args.iterations)
    if args.quick:
        settings = dataclasses.replace(settings, iterations=2, batch=4, heldout=16, eval_every=1)
    load = os.getloadavg()[0]
    replicas = preflight.replicas(open_model(source), settings)
    runs = {"before (one replica)": timed_run(source, settings, 1, physical_cores()),
            "after (default)": timed_run(source, settings, replicas, preflight.threads_per_replica(settings, replicas))}
    before, after = runs.values()
    print(f"load average at start {load:.2f}; the default run, {settings.iterations} iterations")
    print(f"{'iteration':>9} " + " ".join(f"{label:>28}" for label in runs))
    for b, a in zip(before["points"], after["points"]):
        print(f"{b['iteration']:>9} {b['accuracy']:>14.3f} at {b['minutes']:>6.2f} min "
              f"{a['accuracy']:>14.3f} at {a['minutes']:>6.2f} min")
    result = {"model": source.name, "iterations": settings.iterations, "quick": args.quick, "load_average": round(load, 2), "runs": runs,
              "speedup": round(before["minutes"] / after["minutes"], 3),
              "same_bytes": before["tuned_sha256"] == after["tuned_sha256"]}
    print(f"whole run: {before['minutes']:.2f} -> {after['minutes']:.2f} min ({result['speedup']:.2f}x); "
          f"same bytes: {result['same_bytes']}")
    args.json.write_text(json.dumps(result, indent=1))
    plot(runs, args.png)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
