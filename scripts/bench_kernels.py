"""How long the QES kernels take on a real model: perturb + restore, the dense reference, one update.

    python scripts/bench_kernels.py [MODEL.gguf] [--sigma 0.01] [--quick] [--json bench_kernels.json]

Prints a table and, as its last line, one JSON object.  ``dense_reference_ms``
is the same perturb + restore done the way the paper's code does it: one
normal drawn per code, stochastic rounding, gating and restore over dense
numpy arrays (in --quick mode it is measured on a tenth of the tensors and
scaled up, which the JSON says).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from qes_edge.formats import format_of
from qes_edge.gguf_file import default_model_path, make_working_copy, open_model
from qes_edge.kernels import CodeSpace, TensorSlot
from qes_edge.residual import ReplayResidual, SidecarResidual


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

        start = time.perf_counter()
        space = CodeSpace(buf, slots, args.sigma)
        space.perturb(1)
        space.restore(1)
        first_call_ms = (time.perf_counter() - start) * 1e3

        repeats = 5 if args.quick else 21
        seeds = iter(range(2, 10**6))

        def perturb_restore():
            seed = next(seeds)
            space.perturb(seed)
            space.restore(seed)

        perturb_restore_ms = timed(perturb_restore, repeats)

        rng = np.random.default_rng(0)
        dense_tensors = model.trainable[::10] if args.quick else model.trainable
        share = sum(t.n_elements for t in dense_tensors) / model.trainable_codes
        dense_ms = timed(lambda: dense_perturb_restore(buf, dense_tensors, args.sigma, rng),
                         1 if args.quick else 3) / share

        pairs = args.population // 2
        history = [(np.arange(1, pairs + 1, dtype=np.int64) + 100 * h, rng.integers(-3000, 3000, pairs))
                   for h in range(args.window + 1)]
        sidecar = SidecarResidual(workdir / "residual.bin", model.fingerprint, space.n_codes)
        update_repeats = 2 if args.quick else 5
        sidecar_history = []

        def sidecar_update():
            sidecar_history.append(history[len(sidecar_history) % len(history)])
            sidecar.update(space, sidecar_history, 0.9)

        sidecar_update()  # compile
        update_sidecar_ms = timed(sidecar_update, update_repeats)
        sidecar.close()
        replay = ReplayResidual(args.window)
        replay.update(space, history[:2], 0.9)  # compile
        update_replay_ms = timed(lambda: replay.update(space, history, 0.9), 1 if args.quick else 3)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    result = {
        "model": model_path.name,
        "sigma": args.sigma,
        "trainable_codes": model.trainable_codes,
        "perturbed_codes": round(space.noise.density * model.trainable_codes),
        "perturb_restore_ms": round(perturb_restore_ms, 2),
        "dense_reference_ms": round(dense_ms, 1),
        "dense_reference_scaled_from_fraction": round(share, 3),
        "speedup_vs_dense": round(dense_ms / perturb_restore_ms, 1),
        "update_ms": {"sidecar": round(update_sidecar_ms, 1), "replay": round(update_replay_ms, 1)},
        "update_population": args.population,
        "replay_window": args.window,
        "first_call_ms": round(first_call_ms, 1),
        "threads": int(os.environ.get("NUMBA_NUM_THREADS", os.cpu_count() or 1)),
        "quick": args.quick,
    }
    rows = [
        ("trainable codes", f"{model.trainable_codes:,}"),
        ("codes perturbed per candidate", f"{result['perturbed_codes']:,}"),
        ("perturb + restore (median)", f"{perturb_restore_ms:.1f} ms"),
        ("dense reference (one normal per code)", f"{dense_ms:.0f} ms"),
        ("speed-up", f"{result['speedup_vs_dense']}x"),
        (f"update, sidecar (N={args.population})", f"{update_sidecar_ms:.0f} ms"),
        (f"update, replay (N={args.population}, K={args.window})", f"{update_replay_ms:.0f} ms"),
        ("first call (JIT compile or cache load)", f"{first_call_ms:.0f} ms"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
