"""How long the QES kernels take on a real model: perturb + restore, the dense reference, one update.

    python scripts/bench_kernels.py [MODEL.gguf] [--sigma 0.01] [--quick] [--json bench_kernels.json]

Prints a table with a column per kernel set (Numba, and the native C twin when
it is built) and, as its last line, one JSON object whose top-level figures are
for the default kernel set and whose ``kernels`` key has each set's.
``dense_reference_ms`` is the same perturb + restore done the way the paper's
code does it: one normal drawn per code, stochastic rounding, gating and
restore over dense numpy arrays (in --quick mode it is measured on a tenth of
the tensors and scaled up, which the JSON says).

Start-up, what a user waits for before the first candidate: ``first_call_ms``
is the first perturb + restore on the model (Numba: loading its on-disk cache,
or compiling; native: loading the library).  ``startup_ms`` measures the same
in a fresh process on a tiny tensor, perturb + restore and then the first
update, separately; without --quick Numba is also timed with an empty cache
(``cold``), i.e. compiling, as on the very first run after installing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qes_edge.formats import format_of
from qes_edge.files import make_working_copy
from qes_edge.model_file import open_model
from qes_edge.models import default_model_path
from qes_edge.kernels import CodeSpace, TensorSlot, native
from qes_edge.residual import ReplayResidual, SidecarResidual

# Run in a fresh interpreter: what start-up costs before the first candidate.
STARTUP = """
import sys, time
import numpy as np
from qes_edge.kernels import CodeSpace, TensorSlot
start = time.perf_counter()
space = CodeSpace(np.zeros(18 * 256, np.uint8), [TensorSlot("t", 2, 0, 8192)], 0.1, kernels=sys.argv[1])
space.perturb(1, 5)
space.restore(1, 5)
perturbed = time.perf_counter()
space.update(np.array([[1, 2]]), np.array([[100, -100]]), 0.9, True, np.zeros(8192, np.int16))
space.update(np.array([[1, 2], [3, 4]]), np.array([[100, -100], [5, 6]]), 0.9, True, None)
print((perturbed - start) * 1e3, (time.perf_counter() - perturbed) * 1e3)
"""


def startup(kernels, cold=False):
    """(first perturb + restore, first updates) in ms, in a fresh process; cold: Numba with an empty cache."""
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="qes-numba-cache-") as cache:
        if cold:
            env["NUMBA_CACHE_DIR"] = cache
        out = subprocess.run([sys.executable, "-c", STARTUP, kernels], env=env, check=True, capture_output=True,
                             text=True).stdout.split()
    return {"perturb_restore_ms": round(float(out[0]), 1), "update_ms": round(float(out[1]), 1)}


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def dense_perturb_restore(buf, tensors, sigma, rng):
    """The paper's way: a normal per code, stochastic rounding, gate, write; then write the originals back."""
    for t in tensors:
        fmt = format_of(t.ggml_type)
        raw = buf[t.offset:t.offset + t.n_bytes]
        codes = fmt.read_codes(raw)
        x = sigma * rng.standard_normal(codes.size, dtype=np.float32)
        delta = (np.floor(x) + (rng.random(codes.size, dtype=np.float32) < x - np.floor(x))).astype(np.int32)
        moved = codes + delta
        inside = (moved >= fmt.code_lo) & (moved <= fmt.code_hi)
        fmt.write_codes(raw, np.where(inside, moved, codes))
        fmt.write_codes(raw, codes)


def available_kernels():
    return ["numba"] + (["native"] if native.unavailable_reason() is None else [])


def bench_kernel_set(kernels, buf, slots, model, history, workdir, args):
    """Perturb + restore and both updates with one kernel set; the first call is timed on its own."""
    start = time.perf_counter()
    space = CodeSpace(buf, slots, args.sigma, kernels=kernels)
    space.perturb(1, 5)
    space.restore(1, 5)
    first_call_ms = (time.perf_counter() - start) * 1e3

    seeds = iter(range(2, 10**6))

    def perturb_restore():
        seed = next(seeds)
        space.perturb(seed, seed + 1)
        space.restore(seed, seed + 1)

    perturb_restore_ms = timed(perturb_restore, 5 if args.quick else 21)
    worn = 1
    space.perturb(worn, 5)

    def swap():  # from one candidate of an iteration to the next: one walk of their shared support
        nonlocal worn
        seed = next(seeds)
        space.swap(worn, seed, 5)
        worn = seed

    swap_ms = timed(swap, 5 if args.quick else 21)
    space.restore(worn, 5)

    def sidecar_ms(gamma):
        sidecar = SidecarResidual(workdir / f"residual-{kernels}-{gamma}.bin", model.header_sha256, space.n_codes)
        sidecar_history = []

        def sidecar_update():
            sidecar_history.append(history[len(sidecar_history) % len(history)])
            sidecar.update(space, sidecar_history, gamma)

        sidecar_update()  # compile
        return timed(sidecar_update, 2 if args.quick else 5)

    update_sidecar_ms = sidecar_ms(1.0)  # the default: only the support's residuals are read and written
    update_decay_ms = sidecar_ms(0.9)  # every stored residual decays
    replay = ReplayResidual(args.window)
    replay.update(space, history[:2], 0.9)  # compile
    update_replay_ms = timed(lambda: replay.update(space, history, 0.9), 1 if args.quick else 3)
    return space, {
        "perturb_restore_ms": round(perturb_restore_ms, 2),
        "swap_ms": round(swap_ms, 2),
        "update_ms": {"sidecar": round(update_sidecar_ms, 1), "sidecar_decay_0.9": round(update_decay_ms, 1),
                      "replay": round(update_replay_ms, 1)},
        "first_call_ms": round(first_call_ms, 1),
    }


def print_table(model, result, kernel_sets, figures, args):
    def column(key, fmt):
        return [fmt(figures[k], key) for k in kernel_sets]

    ms = lambda f, key: f"{f[key]:.1f} ms"  # noqa: E731
    update = lambda f, key: f"{f['update_ms'][key]:.0f} ms"  # noqa: E731
    startup_ms = lambda f, key: f"{f['startup_ms'][key]:.0f} ms"  # noqa: E731
    rows = [
        ("trainable codes", [f"{model.trainable_codes:,}"]),
        ("codes perturbed per candidate", [f"{result['perturbed_codes']:,}"]),
        ("dense reference (one normal per code)", [f"{result['dense_reference_ms']:.0f} ms"]),
        ("kernels", [k + (" (default)" if k == result["default_kernels"] else "") for k in kernel_sets]),
        ("perturb + restore (median)", column("perturb_restore_ms", ms)),
        ("swap to the next candidate (restore + perturb in one walk)", column("swap_ms", ms)),
        ("speed-up vs dense", [f"{result['dense_reference_ms'] / figures[k]['perturb_restore_ms']:.0f}x"
                               for k in kernel_sets]),
        (f"update, sidecar (N={args.population}, γ 1)", column("sidecar", update)),
        (f"update, sidecar (N={args.population}, γ 0.9)", column("sidecar_decay_0.9", update)),
        (f"update, replay (N={args.population}, K={args.window})", column("replay", update)),
        ("first call on the model (cache load / library load)", column("first_call_ms", ms)),
        ("start-up, fresh process: first perturb + restore", column("perturb_restore_ms", startup_ms)),
        ("start-up, fresh process: first updates", column("update_ms", startup_ms)),
    ]
    if "cold" in figures["numba"]["startup_ms"]:
        cold = figures["numba"]["startup_ms"]["cold"]
        rows.append(("numba with an empty cache (compiling): first perturb + restore, first updates",
                     [f"{cold['perturb_restore_ms']:.0f} ms, {cold['update_ms']:.0f} ms"]))
    width = max(len(name) for name, _ in rows)
    for name, values in rows:
        print(f"{name:<{width}}  " + "  ".join(f"{v:>16}" for v in values))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="GGUF file (default: SmolLM2-135M-Instruct Q4_1)")
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--window", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="small repeat counts; finishes within 60 s")
    parser.add_argument("--json", default="bench_kernels.json", help="where to write the JSON result")
    args = parser.parse_args()

    model_path = Path(args.model) if args.model else default_model_path()
    model = open_model(model_path)
    workdir = Path(tempfile.mkdtemp(prefix="qes-bench-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    try:
        live = make_working_copy(model_path, workdir / "live.gguf")
        buf = np.memmap(live, dtype=np.uint8, mode="r+")
        slots = [TensorSlot(t.name, t.ggml_type, t.offset, t.n_elements) for t in model.trainable]

        default = native.select()
        kernel_sets = [default] + [k for k in ("numba", "native") if k != default and k in available_kernels()]
        rng = np.random.default_rng(0)
        dense_tensors = model.trainable[::10] if args.quick else model.trainable
        share = sum(t.n_elements for t in dense_tensors) / model.trainable_codes
        dense_ms = timed(lambda: dense_perturb_restore(buf, dense_tensors, args.sigma, rng),
                         1 if args.quick else 3) / share

        pairs = args.population // 2
        history = [(np.arange(1, pairs + 1, dtype=np.int64) + 100 * h, rng.integers(-3000, 3000, pairs))
                   for h in range(args.window + 1)]
        figures = {}
        for kernels in kernel_sets:
            space, figures[kernels] = bench_kernel_set(kernels, buf, slots, model, history, workdir, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    for kernels in kernel_sets:
        figures[kernels]["startup_ms"] = startup(kernels)
    if not args.quick:
        figures["numba"]["startup_ms"]["cold"] = startup("numba", cold=True)

    chosen = figures[default]
    result = {
        "model": model_path.name,
        "sigma": args.sigma,
        "trainable_codes": model.trainable_codes,
        "perturbed_codes": round(space.noise.density * model.trainable_codes),
        "perturb_restore_ms": chosen["perturb_restore_ms"],
        "dense_reference_ms": round(dense_ms, 1),
        "dense_reference_scaled_from_fraction": round(share, 3),
        "speedup_vs_dense": round(dense_ms / chosen["perturb_restore_ms"], 1),
        "update_ms": chosen["update_ms"],
        "update_population": args.population,
        "replay_window": args.window,
        "first_call_ms": chosen["first_call_ms"],
        "threads": int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count() or 1)),
        "quick": args.quick,
        "default_kernels": default,
        "kernels": figures,
    }
    print_table(model, result, kernel_sets, figures, args)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
