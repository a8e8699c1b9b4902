"""Where an iteration's time goes, and whether training runs at inference-level memory.

    python scripts/bench_iteration.py [MODEL.gguf] [--iterations 3] [--quick] [--json bench_iteration.json]

Time: real training runs with the default settings (`qes_edge.settings.Settings`,
overridable), timed by the phases the library marks (`qes_edge.phases`):
llama.cpp inference (`Scorer.rewards`: batched generation and the reward, or the reply likelihoods),
and everything QES adds (perturb, swap and restore: every walk of a
candidate's support, as one piece; the update, the mirrors' copy of
the updated bytes, checkpoint and metrics writes).  The held-out evaluations
are reporting, not training, and are left out of the iteration time (shown
on their own line), as are the one sync of the working copy and the residual
to disk when the run closes and the run's set-up (working copy, mirrors,
model loads): once per run, not per iteration, each on its own line.  An
iteration is what the trainer records as its scoring and update time
(``score_s`` + ``update_s`` in metrics.jsonl) plus its checkpoint and
metrics writes.  Two runs, side by side: one replica with every core's thread
(the path before ``--parallel``) and the default (``qes_edge.preflight``:
one replica per core); ``speedup_vs_single_replica`` is the ratio of their
iteration times, and their tuned weights must be the same bytes.  With
several replicas, the walks run on every replica at once, so their
seconds (summed over replicas) count 1/replicas towards the overhead;
the update and the writes run alone and count in full.

Memory: three fresh processes on the same model, prompts and evaluator:
inference only (every candidate's prompts scored on the unperturbed model),
training with the sidecar residual, training with the replay residual.  Each
reports its peak RSS (ru_maxrss) and, sampled after every candidate, its peak
proportional set size (PSS, from /proc/self/smaps_rollup).  RSS counts a
shared page once per mapping, and training maps the working copy twice (by
llama.cpp and by numpy), so PSS — physical memory, shared pages split among
their users — is the fairer figure; both are printed.  The sidecar's pages
are file-backed (page cache) and count while mapped.

Prints a table, writes JSON (--json) and a PNG (--png), and prints the JSON as its last line.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from qes_edge.models import default_model_path
from qes_edge.model_file import open_model
from qes_edge.settings import Settings, value_type

OVERRIDABLE = ("iterations", "population", "batch", "max_tokens", "sigma", "alpha", "threads", "heldout")


def pss_mb(pid: int | str = "self") -> float:
    """A process's proportional set size now (this one's by default), MB; NaN where it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def settings_from(args) -> Settings:
    given = {k: getattr(args, k) for k in OVERRIDABLE if getattr(args, k) is not None}
    return Settings(eval_every=10 ** 6, **given).for_codes(open_model(args.model).codes_by_type)


def time_breakdown(model: Path, settings: Settings, replicas: int, threads: int, keep: Path | None = None) -> dict:
    """Train a run and split its time by phase; ``keep``: a directory for the run and its tuned GGUF, kept
    after (else a temporary one)."""
    from qes_edge import api, phases
    from qes_edge.files import file_sha256
    from qes_edge.run import read_metrics

    phases.reset()
    with tempfile.TemporaryDirectory(prefix="bench-iteration-") as tmp:
        where = Path(keep or tmp)
        training = api.start(model, settings, run_dir=where / "run", out=where / "tuned.gguf",
                             replicas=replicas, threads=threads)
        total = api.train(training).seconds
        weights = file_sha256(training.out)
        steps = [m.step for m in read_metrics(training.run.run_dir) if m.step]
        run_dir_files = sorted(p.name for p in (where / "run").iterdir())
    n = settings.iterations
    seconds, calls = phases.seconds(), phases.calls()
    heldout = seconds.pop(phases.HELDOUT)
    sync = seconds.pop(phases.SYNC)
    # heldout() generates on its own (rewards() only for log-prob tasks), so inference is the candidates'.
    # An iteration: scoring and the update, as the trainer times them, and its checkpoint and metrics writes;
    # what else the run took (copies made, models loaded: once per run) is its set-up.
    writes = (seconds[phases.CHECKPOINT] + seconds[phases.METRICS]) / n
    iteration = sum(m.score_s + m.update_s for m in steps) / n + writes
    setup = total - heldout - sync - n * iteration
    inference = seconds[phases.INFERENCE] / n  # summed over the replicas
    qes = {k: seconds[k] / n for k in (phases.PERTURB, phases.UPDATE, phases.FOLLOW, phases.CHECKPOINT, phases.METRICS)}
    on_every_replica = {"perturb"}
    overhead = sum(v / (replicas if k in on_every_replica else 1) for k, v in qes.items())
    other = iteration - (inference + qes["perturb"]) / replicas - \
        sum(v for k, v in qes.items() if k not in on_every_replica)
    return {"replicas": replicas, "threads": threads, "iteration_s": iteration, "inference_s": inference,
            "qes_s": qes, "other_s": other,
            "heldout_eval_s": heldout / max(1, calls[phases.HELDOUT]), "sync_at_close_s": sync,
            "setup_s": setup,
            "qes_overhead_fraction": overhead / iteration, "weights_sha256": weights, "run_dir_files": run_dir_files}


# ---- memory: each measurement in its own process ----------------------------------------------

def measure_memory(mode: str, model: Path, settings: Settings) -> dict:
    """Run in a child process: peak RSS and PSS of inference only, or of training with a residual store."""
    from qes_edge import api
    from qes_edge.es import iteration_batch
    from qes_edge.files import make_working_copy
    from qes_edge import phases
    from qes_edge.model_file import open_model

    peak_pss = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-memory-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None) \
            as tmp:
        if mode == "infer":
            live = make_working_copy(model, Path(tmp) / "live.gguf")
            with api.open_scorer(live, settings, open_model(model), n_seq_max=settings.batch) as scorer:
                task = scorer.task
                for t in range(settings.iterations):
                    batch = iteration_batch(task, settings.seed, t, settings.batch)
                    for _ in range(settings.population):
                        scorer.rewards(batch)
                        peak_pss = max(peak_pss, pss_mb())
            sidecar_bytes = 0
        else:
            def sampled(phase: str) -> None:
                nonlocal peak_pss
                if phase == phases.INFERENCE:  # after every candidate's prompts
                    peak_pss = max(peak_pss, pss_mb())

            phases.listeners.append(sampled)
            store = mode.removeprefix("train-")
            run_dir = Path(tmp) / "run"
            training = api.start(model, dataclasses.replace(settings, residual=store), run_dir=run_dir, replicas=1,
                                 threads=settings.threads)
            training.out = None
            api.train(training)
            peak_pss = max(peak_pss, pss_mb())
            sidecar = run_dir / "residual.bin"
            sidecar_bytes = sidecar.stat().st_size if sidecar.exists() else 0
    return {"peak_rss_mb": peak_rss_mb(), "peak_pss_mb": peak_pss, "sidecar_bytes": sidecar_bytes}


def memory_in_child(mode: str, args) -> dict:
    command = [sys.executable, __file__, str(args.model), "--memory-child", mode]
    for key in OVERRIDABLE:
        if getattr(args, key) is not None:
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    pieces = {"inference": result["inference_s"], **result["qes_s"], "other": max(0.0, result["other_s"])}
    colors = ["tab:blue"] + ["tab:orange"] * len(result["qes_s"]) + ["tab:gray"]
    time_axis.bar(list(pieces), list(pieces.values()), color=colors)
    time_axis.set_yscale("log")
    time_axis.set_ylabel("seconds per iteration (log)")
    time_axis.set_title(f"QES adds {100 * result['qes_overhead_fraction']:.2f}% to an iteration")
    time_axis.tick_params(axis="x", rotation=30)
    modes = list(result["memory"])
    memory_axis.bar([m + " RSS" for m in modes], [result["memory"][m]["peak_rss_mb"] for m in modes], color="tab:blue")
    memory_axis.bar([m + " PSS" for m in modes], [result["memory"][m]["peak_pss_mb"] for m in modes],
                    color="tab:green")
    memory_axis.set_ylabel("peak MB")
    memory_axis.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=None)
    for key in OVERRIDABLE:
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, type=value_type(key),
                            default=None)
    parser.add_argument("--quick", action="store_true", help="2 iterations, population 2, batch 8 (under a minute on a quiet machine)")
    parser.add_argument("--json", type=Path, default=Path("bench_iteration.json"))
    parser.add_argument("--png", type=Path, default=Path("bench_iteration.png"))
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or default_model_path()
    if args.quick:
        for key, value in (("iterations", 2), ("population", 2), ("batch", 8), ("heldout", 8)):
            if getattr(args, key) is None:
                setattr(args, key, value)
    if args.iterations is None:
        args.iterations = 3
    settings = settings_from(args)
    if args.memory_child:
        print(json.dumps(measure_memory(args.memory_child, args.model, settings)))
        return

    load = os.getloadavg()[0]
    from qes_edge import preflight
    from qes_edge.model_file import open_model

    replicas = preflight.replicas(open_model(args.model), settings)
    single = time_breakdown(args.model, settings, 1, settings.threads or preflight.physical_cores())
    result = time_breakdown(args.model, settings, replicas, preflight.threads_per_replica(settings, replicas))
    result["single_replica"] = {k: v for k, v in single.items() if k != "run_dir_files"}
    result["speedup_vs_single_replica"] = single["iteration_s"] / result["iteration_s"]
    result["bytes_identical"] = single["weights_sha256"] == result["weights_sha256"]
    result["memory"] = {mode: memory_in_child(mode, args) for mode in ("infer", "train-sidecar", "train-replay")}
    memory = result["memory"]
    result.update({
        "peak_rss_infer_mb": memory["infer"]["peak_rss_mb"],
        "peak_rss_train_mb": {store: memory[f"train-{store}"]["peak_rss_mb"] for store in ("sidecar", "replay")},
        "peak_pss_infer_mb": memory["infer"]["peak_pss_mb"],
        "peak_pss_train_mb": {store: memory[f"train-{store}"]["peak_pss_mb"] for store in ("sidecar", "replay")},
        "sidecar_file_bytes": memory["train-sidecar"]["sidecar_bytes"],
        "settings": {k: getattr(settings, k) for k in OVERRIDABLE},
        "model": str(args.model), "load_average": round(load, 2), "quick": args.quick,
    })
    del result["run_dir_files"]

    print(f"{settings.iterations} iterations, population {settings.population}, batch {settings.batch}, "
          f"sigma {settings.sigma}, alpha {settings.alpha}; load average {load:.2f}")
    print(f"{'piece':<24} {'s / iteration':>14} {'share':>8}")
    rows = [("llama.cpp inference", result["inference_s"])] + \
           [(f"QES: {k}", v) for k, v in result["qes_s"].items()] + [("other (Python, shaping)", result["other_s"])]
    print(f"{result['replicas']} replicas x {result['threads']} threads (shares: of the replicas' time)")
    for name, value in rows:
        print(f"{name:<24} {value:>14.4f} {100 * value / result['iteration_s'] / result['replicas']:>7.2f}%")
    print(f"{'iteration':<24} {result['iteration_s']:>14.3f}")
    print(f"{'one replica, iteration':<24} {single['iteration_s']:>14.3f}  ({single['threads']} threads; "
          f"speedup {result['speedup_vs_single_replica']:.2f}x, bytes identical: {result['bytes_identical']})")
    print(f"QES overhead: {100 * result['qes_overhead_fraction']:.2f}% (target <= 1%); "
          f"held-out evaluation, per evaluation: {result['heldout_eval_s']:.1f} s; "
          f"sync to disk at close, once per run: {result['sync_at_close_s']:.2f} s; "
          f"set-up, once per run: {result['setup_s']:.1f} s (one replica: {single['setup_s']:.1f} s)")
    print(f"{'memory':<24} {'peak RSS MB':>12} {'peak PSS MB':>12} {'x inference (PSS)':>18}")
    for mode, figures in memory.items():
        ratio = figures["peak_pss_mb"] / memory["infer"]["peak_pss_mb"]
        print(f"{mode:<24} {figures['peak_rss_mb']:>12.0f} {figures['peak_pss_mb']:>12.0f} {ratio:>18.2f}")
    print(f"sidecar file: {result['sidecar_file_bytes'] / 2**20:.0f} MiB on disk")
    args.json.write_text(json.dumps(result, indent=1))
    plot(result, args.png)
    print(json.dumps(result))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
