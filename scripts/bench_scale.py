"""What a run costs as the model grows, and that every step of it works, from 1B to 7B parameters.

    python scripts/bench_scale.py [--models llama-1b:q4_0,llama-1b:q4_k_m,llama-3b:q4_k_m,qwen2-7b:q4_k_m]
                                  [--dir scale-models] [--steps pipeline,default,replay]
                                  [--json benchmarks/scale.json] [--png benchmarks/scale.png] [--quick]

Each model is made by scripts/scale_models.py (real shapes and quant mixes,
random codes; generated into --dir, never committed).  Per model, as a user
would run it, each step in a process of its own:

1. ``qes-edge inspect`` and the preflight's estimate for the run below;
2. inference alone: the run's candidates scored on the unperturbed model
   (bench_iteration's inference-only memory mode), its peak RSS and PSS; and
   llama.cpp's own speed on the model, as llama-bench measures it (a
   512-token prompt in one batch, 32 tokens generated one at a time), the
   figures that carry this machine's minutes to other machines;
3. a short training run (population 2, batch 2, 4 tokens, 2 iterations, 2
   held-out items, the defaults otherwise; replicas and threads as a user
   gets them) timed by the library's phases: seconds per candidate and per
   iteration, the walks (perturb, swap, restore), the update, QES's share;
   its peak RSS and PSS; the disk it used (working copy, sidecar);
4. ``qes-edge export`` of the finished run (its working copy was released,
   so this rebuilds the model by replay from the base), and the export
   loaded by llama.cpp, which generates from it;
5. ``export --recipe`` and ``qes-edge apply``: the same sha256 as the export;
6. the same run killed with SIGKILL mid-iteration (after its second
   iteration's first candidate is kept), resumed: the uninterrupted run's
   sha256, and how long the resume took to start scoring again;
7. (step ``default``) one iteration at the default settings (population 8,
   batch 16, the task's tokens; 2 held-out items), the figure the docs' table
   of minutes per iteration is made from;
8. (step ``replay``) the short run with ``--residual replay`` over 4
   iterations: what an update costs per iteration of its replay window.

Steps 1-6 are the step ``pipeline``; ``--steps`` picks some.  The rows of
the models measured replace theirs in --json (written after every model),
the other rows stay; a step whose command fails is recorded in its row's
``failed`` and the next step runs.  Bytes written are the
process's own (/proc/PID/io: its writes and the pages it dirtied).

Peak RSS is the kernel's (wait4) for the whole process; PSS is sampled every
half second from /proc/PID/smaps_rollup (RSS counts the working copy twice,
mapped by llama.cpp and by numpy, and the sidecar's page-cache pages while
an update maps them; PSS splits shared pages).  Timings are honest only with
nothing else running.  Prints a table, writes --json and --png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_iteration import pss_mb
from scale_models import SHAPES, make_model

from qes_edge.files import file_sha256

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent
SHORT = {"population": 2, "batch": 2, "max_tokens": 4, "iterations": 2, "heldout": 2, "eval_every": 1000,
         "task": "arithmetic"}
DEFAULT_ITERATION = {"iterations": 1, "heldout": 2, "eval_every": 1000, "task": "arithmetic"}
MB = 2**20


@dataclasses.dataclass
class Measured:
    code: int
    seconds: float
    peak_rss_mb: float
    peak_pss_mb: float
    output: str
    written_mb: float  # what the process sent (or dirtied, for storage) to be written to disk: /proc/PID/io


def written_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1]) / MB
    except (OSError, ValueError):
        pass
    return None


def measured(command: list[str], kill_when=None) -> Measured:
    """Run ``command``: exit code, wall seconds, peak RSS (wait4), peak sampled PSS, output.  ``kill_when()``
    is asked at every sample (every half second after the first); when it says so, the process gets SIGKILL."""
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)
        started, peak_pss, written, pause = time.perf_counter(), 0.0, 0.0, 0.02
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            peak_pss = max(peak_pss, pss_mb(process.pid))
            written = written_mb(process.pid) or written
            if kill_when is not None and kill_when():
                os.kill(process.pid, signal.SIGKILL)
                kill_when = None
            time.sleep(pause)
            pause = min(0.5, 2 * pause)  # short steps first: a quick command's wall time stays exact
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        return Measured(process.returncode, time.perf_counter() - started, usage.ru_maxrss / 1024, peak_pss,
                        out.read(), written)


def qes_edge(*args) -> list[str]:
    return [sys.executable, "-m", "qes_edge", *map(str, args)]


def options(settings: dict) -> list[str]:
    return [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))]


class StepFailed(Exception):
    """A command of a step exited with an error: the row records its last line, and the next step runs."""


def checked(step: str, result: Measured) -> Measured:
    if result.code != 0:
        lines = [line for line in result.output.splitlines() if line.strip()]
        raise StepFailed(f"{step}: exit {result.code}: {lines[-1] if lines else ''}")
    return result


# ---- children: what runs in a process of its own ----------------------------------------------------

def train_child(model: Path, where: Path, settings: dict) -> None:
    """Train with the phases timed (bench_iteration.time_breakdown), the run kept in ``where``; JSON out."""
    from bench_iteration import time_breakdown

    from qes_edge import preflight
    from qes_edge.model_file import open_model
    from qes_edge.settings import Settings

    s = Settings(**settings)
    replicas = preflight.replicas(open_model(model), s)
    result = time_breakdown(model, s, replicas, preflight.threads_per_replica(s, replicas), keep=where)
    print(json.dumps(result))


def load_child(model: Path) -> None:
    """The GGUF loaded by llama.cpp and a few tokens generated from it."""
    from qes_edge.stock_llama import stock_llama

    llm = stock_llama(model, n_ctx=128, n_threads=os.cpu_count(), verbose=False)
    text = llm("What is 2 + 3?", max_tokens=4)["choices"][0]["text"]
    print(json.dumps({"loaded": True, "text": text}))


def iteration_lines(run_dir: Path) -> list[dict]:
    """metrics.jsonl's lines of completed iterations (not the base model's held-out line)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "score_s" in line]


def throughput_child(model: Path) -> None:
    """llama.cpp's own speed on the model, as llama-bench measures it: a 512-token prompt processed in one
    batch (pp512, the work that scores candidates) and 32 tokens generated one at a time (tg32)."""
    import numpy as np

    from qes_edge.stock_llama import stock_llama

    llm = stock_llama(model, n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=os.cpu_count(), verbose=False)
    tokens = np.random.default_rng(0).integers(1000, 40000, 512).tolist()
    llm.eval(tokens[:16])  # warm up
    llm.reset()
    started = time.perf_counter()
    llm.eval(tokens)
    pp = 512 / (time.perf_counter() - started)
    started = time.perf_counter()
    for token in tokens[:32]:
        llm.eval([token])
    tg = 32 / (time.perf_counter() - started)
    print(json.dumps({"pp512_tps": round(pp, 2), "tg32_tps": round(tg, 2), "threads": os.cpu_count()}))


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


# ---- one model ---------------------------------------------------------------------------------------

def measure(shape: str, mix: str, models: Path, steps: tuple[str, ...], row: dict | None = None) -> dict:
    """One model's row (``row``: an earlier one, its ``steps`` measured again)."""
    from qes_edge import preflight
    from qes_edge.model_file import open_model
    from qes_edge.settings import Settings

    made = time.perf_counter()
    path = make_model(shape, mix, models)
    made = time.perf_counter() - made
    model = open_model(path)
    settings = Settings(**SHORT)
    replicas = preflight.replicas(model, settings)
    row = row or {}
    row.update({"model": path.name, "shape": shape, "params": SHAPES[shape].params(), "arch": SHAPES[shape].arch,
                "type": mix.upper(), "file_mb": round(path.stat().st_size / MB, 1),
                "trainable_codes": model.trainable_codes, "settings": SHORT, "replicas": replicas,
                "threads": preflight.threads_per_replica(settings, replicas)})
    print(f"{path.name}: {row['params'] / 1e9:.2f} B parameters, {row['file_mb']:,.0f} MB"
          + (f" (made in {made:.0f} s)" if made > 1 else ""), flush=True)
    row.pop("failed", None)
    for step in steps:
        try:
            STEPS[step](row, path, model)
        except StepFailed as e:
            row.setdefault("failed", []).append(str(e))
            print(f"  failed: {e}", flush=True)
    return row


def pipeline(row: dict, path: Path, model) -> None:
    """inspect, the estimate, inference alone, llama.cpp's speed, the short run, export, load, recipe, kill."""
    from qes_edge import preflight
    from qes_edge.settings import Settings

    estimate = preflight.estimate(model, Settings(**SHORT), row["replicas"])
    inspect = checked("inspect", measured(qes_edge("inspect", path)))
    row["inspect_s"] = round(inspect.seconds, 2)
    row["estimate"] = {"ram_mb": round(estimate.ram / MB), "working_copy_mb": round(estimate.working_copy / MB),
                       "sidecar_mb": round(estimate.sidecar / MB)}

    infer = checked("inference alone", measured(
        [sys.executable, str(SCRIPTS / "bench_iteration.py"), str(path), "--memory-child", "infer",
         "--iterations", "1", "--population", "2", "--batch", "2", "--max-tokens", "4"]))
    row["inference_alone"] = {"peak_rss_mb": round(infer.peak_rss_mb), "peak_pss_mb": round(infer.peak_pss_mb)}
    row["llama_cpp"] = last_json(checked("throughput", measured(
        [sys.executable, __file__, "--throughput-child", str(path)])).output)

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp = Path(tmp)
        run = checked("training", measured([sys.executable, __file__, "--train-child", str(path), str(tmp / "a")]))
        times = last_json(run.output)
        run_dir, tuned = tmp / "a" / "run", tmp / "a" / "tuned.gguf"
        steps = iteration_lines(run_dir)
        sidecar = run_dir / "residual.bin"
        row.update({
            "trained": True, "peak_rss_mb": round(run.peak_rss_mb), "peak_pss_mb": round(run.peak_pss_mb),
            "disk_mb": round((estimate.working_copy + (sidecar.stat().st_size if sidecar.exists() else 0)) / MB),
            "sidecar_mb": round(sidecar.stat().st_size / MB) if sidecar.exists() else 0,
            "iteration_s": round(times["iteration_s"], 2),
            "candidate_s": round(times["inference_s"] / SHORT["population"], 2),
            "perturb_s": round(times["qes_s"]["perturb"], 3), "update_s": round(times["qes_s"]["update"], 3),
            "follow_s": round(times["qes_s"]["follow"], 3),
            "checkpoint_s": round(times["qes_s"]["checkpoint"] + times["qes_s"]["metrics"], 3),
            "qes_overhead": round(times["qes_overhead_fraction"], 4), "setup_s": round(times["setup_s"], 1),
            "heldout_eval_s": round(times["heldout_eval_s"], 1), "sync_at_close_s": round(times["sync_at_close_s"], 2),
            "codes_stepped": [s["codes_stepped"] for s in steps], "train_wall_s": round(run.seconds, 1),
            "train_written_mb": round(run.written_mb),
        })

        exported = tmp / "exported.gguf"
        export = checked("export", measured(qes_edge("export", run_dir, "--out", exported, "--recipe", tmp / "recipe")))
        row["export_s"] = round(export.seconds, 1)
        row["export_peak_rss_mb"] = round(export.peak_rss_mb)
        row["export_matches_training"] = file_sha256(exported) == file_sha256(tuned)
        load = measured([sys.executable, __file__, "--load-child", str(exported)])
        row["exported_loads"] = load.code == 0 and last_json(load.output)["loaded"]
        row["load_s"] = round(load.seconds, 1)
        applied = tmp / "applied.gguf"
        apply = checked("apply", measured(qes_edge("apply", tmp / "recipe", path, "--out", applied)))
        row["recipe_bytes"] = (tmp / "recipe").stat().st_size
        row["apply_s"] = round(apply.seconds, 1)
        row["recipe_applies"] = file_sha256(applied) == file_sha256(tuned)
        for f in (exported, applied):
            f.unlink()

        killed_dir, killed_out = tmp / "killed", tmp / "killed.gguf"

        def mid_iteration() -> bool:  # iteration 2's first candidate kept
            try:
                return json.loads((killed_dir / "scored.json").read_text())["iteration"] == 1
            except (OSError, ValueError, KeyError):
                return False

        command = qes_edge("train", path, *options(SHORT), "--run-dir", killed_dir, "--out", killed_out)
        killed = measured(command, kill_when=mid_iteration)
        row["killed_mid_iteration"] = killed.code == -signal.SIGKILL
        try:
            resumed = checked("resume", measured(qes_edge("train", "--resume", killed_dir, "--out", killed_out)))
        finally:  # the killed run's working copy is on /dev/shm: RAM until released
            from qes_edge.run import Run
            from qes_edge.working_copy import release

            release(Run.load(killed_dir))
        row["resume_same_bytes"] = file_sha256(killed_out) == file_sha256(tuned)
        row["resume_s"] = round(resumed.seconds, 1)



def default_iteration(row: dict, path: Path, model) -> None:
    """One iteration at the default settings (2 held-out items): the docs' minutes per iteration."""
    from qes_edge import preflight
    from qes_edge.settings import Settings

    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        run_dir = Path(tmp) / "run"
        one = checked("default iteration", measured(qes_edge(
            "train", path, *options(DEFAULT_ITERATION), "--run-dir", run_dir, "--out", Path(tmp) / "t.gguf")))
        step = iteration_lines(run_dir)[0]
        row["default_iteration_s"] = round(step["score_s"] + step["update_s"], 1)
        row["default_update_s"] = round(step["update_s"], 2)
        row["default_iteration_peak_rss_mb"] = round(one.peak_rss_mb)
        row["default_iteration_peak_pss_mb"] = round(one.peak_pss_mb)
        row["default_iteration_written_mb"] = round(one.written_mb)
        defaults = Settings(**DEFAULT_ITERATION)
        row["default_estimate_ram_mb"] = round(preflight.estimate(
            model, defaults, preflight.replicas(model, defaults)).ram / MB)


def replay_update(row: dict, path: Path, model) -> None:
    """The short run with --residual replay and 4 iterations: an update replays every iteration in its
    window, so its time grows by one iteration's replay each time; the slope is that cost."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        run_dir = Path(tmp) / "run"
        run = checked("replay", measured(qes_edge(
            "train", path, *options({**SHORT, "iterations": 4}), "--residual", "replay",
            "--run-dir", run_dir, "--out", Path(tmp) / "t.gguf")))
        updates = [line["update_s"] for line in iteration_lines(run_dir)]
    row["replay_update_s"] = updates
    row["replay_per_iteration_s"] = round((updates[-1] - updates[0]) / (len(updates) - 1), 3)
    row["replay_peak_pss_mb"] = round(run.peak_pss_mb)
    row["replay_written_mb"] = round(run.written_mb)


STEPS = {"pipeline": pipeline, "default": default_iteration, "replay": replay_update}


COLUMNS = [  # the printed table: title, value, width, format
    ("model", lambda r: r["model"].removesuffix(".gguf"), 16, ""), ("B params", lambda r: r["params"] / 1e9, 8, ".2f"),
    ("RSS MB", lambda r: r.get("peak_rss_mb"), 7, ","), ("phys MB", lambda r: r.get("physical_peak_mb"), 7, ","),
    ("est MB", lambda r: r.get("estimate", {}).get("ram_mb"), 7, ","),
    ("infer PSS", lambda r: r.get("inference_alone", {}).get("peak_pss_mb"), 9, ","),
    ("disk MB", lambda r: r.get("disk_mb"), 7, ","), ("cand s", lambda r: r.get("candidate_s"), 6, ""),
    ("walks s", lambda r: r.get("perturb_s"), 7, ""), ("update s", lambda r: r.get("update_s"), 8, ""),
    ("QES", lambda r: r.get("qes_overhead"), 6, ".1%"), ("export s", lambda r: r.get("export_s"), 8, ""),
    ("default it s", lambda r: r.get("default_iteration_s"), 12, ""),
    ("replay s/it", lambda r: r.get("replay_per_iteration_s"), 11, ""),
]


def derive(row: dict) -> None:
    """What the measured figures imply.  Peak RSS counts each replica's working copy twice (llama.cpp maps
    it, and numpy maps it to move its codes): less one copy per replica, it is the run's physical memory,
    the figure the preflight estimates."""
    if "peak_rss_mb" in row:
        row["physical_peak_mb"] = round(row["peak_rss_mb"] - row["replicas"] * row["file_mb"])
        row["estimate_vs_physical"] = round(row["estimate"]["ram_mb"] / row["physical_peak_mb"], 3)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in rows if "peak_pss_mb" in r and "export_s" in r), key=lambda r: r["params"])
    params = [r["params"] / 1e9 for r in rows]
    fig, (memory, seconds) = plt.subplots(1, 2, figsize=(10, 4))
    memory.plot(params, [r["peak_pss_mb"] / 1024 for r in rows], "o-", label="training, peak PSS")
    memory.plot(params, [r["inference_alone"]["peak_pss_mb"] / 1024 for r in rows], "s--", label="inference alone, PSS")
    memory.plot(params, [r["estimate"]["ram_mb"] / 1024 for r in rows], "^:", label="preflight estimate")
    memory.plot(params, [r["disk_mb"] / 1024 for r in rows], "x-", label="disk (copy + sidecar)")
    memory.set_xlabel("parameters (billions)")
    memory.set_ylabel("GiB")
    memory.legend()
    seconds.plot(params, [r["candidate_s"] for r in rows], "o-", label="candidate (batch 2, 4 tokens)")
    seconds.plot(params, [r["perturb_s"] + r["update_s"] for r in rows], "s-", label="QES: walks + update")
    seconds.plot(params, [r["export_s"] for r in rows], "^-", label="export (replay)")
    if all("default_iteration_s" in r for r in rows):
        seconds.plot(params, [r["default_iteration_s"] for r in rows], "x-", label="default iteration")
    seconds.set_xlabel("parameters (billions)")
    seconds.set_ylabel("seconds per iteration or step")
    seconds.set_yscale("log")
    seconds.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="llama-1b:q4_0,llama-1b:q4_k_m,llama-3b:q4_k_m,qwen2-7b:q4_k_m")
    parser.add_argument("--dir", type=Path, default=ROOT / "scale-models")
    parser.add_argument("--steps", default=",".join(STEPS),
                        help="what to measure (pipeline, default, replay); a subset updates the rows of --json")
    parser.add_argument("--quick", action="store_true",
                        help="the tiny shape in both mixes (seconds; into scale-quick.json/png here): that it still runs")
    parser.add_argument("--json", type=Path, default=None, help="default: benchmarks/scale.json")
    parser.add_argument("--png", type=Path, default=None, help="default: benchmarks/scale.png")
    parser.add_argument("--train-child", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--load-child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--throughput-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_child:
        return train_child(*args.train_child, SHORT)
    if args.load_child:
        return load_child(args.load_child)
    if args.throughput_child:
        return throughput_child(args.throughput_child)
    if args.quick:
        args.models = "tiny:q4_k_m,tiny:q4_0"
    args.json = args.json or (Path("scale-quick.json") if args.quick else ROOT / "benchmarks" / "scale.json")
    args.png = args.png or (Path("scale-quick.png") if args.quick else ROOT / "benchmarks" / "scale.png")

    load = os.getloadavg()[0]
    steps = tuple(args.steps.split(","))
    earlier = {r["model"]: r for r in json.loads(args.json.read_text())["models"]} if args.json.is_file() else {}
    rows = []
    for spec in args.models.split(","):
        shape, _, mix = spec.partition(":")
        mix = mix or "q4_k_m"
        rows.append(measure(shape, mix, args.dir, steps, earlier.get(f"{shape}-{mix}.gguf")))
        r = rows[-1]
        derive(r)
        write(args.json, rows, earlier, load)  # after every model: a long run's figures survive a failure
        print("  " + ", ".join(f"{k} {r[k]}" for k in ("peak_pss_mb", "iteration_s", "qes_overhead", "export_s",
                                                          "exported_loads", "recipe_applies", "resume_same_bytes",
                                                          "default_iteration_s", "replay_per_iteration_s")
                                if k in r), flush=True)
    print(" ".join(f"{title:>{width}}" for title, _, width, _ in COLUMNS))
    for r in rows:
        print(" ".join((format(get(r), spec) if get(r) is not None else "-").rjust(width)
                       for _, get, width, spec in COLUMNS))
    result = write(args.json, rows, earlier, load)
    plot(result["models"], args.png)
    print(json.dumps(result))


def write(path: Path, rows: list[dict], earlier: dict, load: float) -> dict:
    """The JSON: these rows, and the earlier rows of models not measured again."""
    measured_now = {r["model"] for r in rows}
    result = {"models": rows + [r for name, r in earlier.items() if name not in measured_now],
              "load_average": round(load, 2), "cores": os.cpu_count(),
              "mem_total_mb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / MB)}
    path.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
