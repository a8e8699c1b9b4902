"""Would a 1-byte residual sidecar do? Replays a real run's updates with the residual
kept at 16 bits (what the sidecar stores) and at 8 bits with stochastic rounding.

    python scripts/sidecar_precision.py RUN_DIR [--json sidecar_precision.json]

RUN_DIR is a finished (or interrupted) `qes-edge train` run with error
feedback.  Both arms get the same history of (seeds, weights), so what differs
is only the residual's precision: an "open loop" comparison, free of the
reward noise a second training run would add.  The 8-bit arm keeps the
residual in steps of 2**-8 code (int8, 1 byte per code): after every update
each residual value is rounded to a multiple of 2**7 (in the sidecar's 2**-15
units) up or down, with probability given by the remainder, using a hash of
(code, iteration) so the experiment is repeatable.

Prints a table (codes stepped per arm, codes whose final value differs, held-out
accuracy of each arm's model on the run's own held-out set) and, as its last
line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qes_edge.api import Run, open_scorer
from qes_edge.files import make_working_copy
from qes_edge.kernels import FRACTION_BITS, CodeSpace, TensorSlot
from qes_edge.residual import SidecarResidual

BYTE_BITS = 8  # the 1-byte residual keeps steps of 2**-8 code
QUANTUM = 1 << (FRACTION_BITS - BYTE_BITS)
SLICE = 1 << 23


def stochastic_round_to_byte(values: np.ndarray, iteration: int) -> None:
    """Round each residual (2**-15 units) to a multiple of QUANTUM, in place, unbiased."""
    for start in range(0, len(values), SLICE):
        part = values[start:start + SLICE].astype(np.int64)
        index = np.arange(start, start + len(part), dtype=np.uint64)
        h = (index * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64((iteration + 1) * 0xBF58476D1CE4E5B9 % (1 << 64))
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(29)
        dither = (h % np.uint64(QUANTUM)).astype(np.int64)
        rounded = np.floor_divide(part + dither, QUANTUM) * QUANTUM
        values[start:start + SLICE] = np.clip(rounded, -128 * QUANTUM, 127 * QUANTUM).astype(np.int16)


def replay(run: Run, model, live: Path, byte_residual: bool) -> tuple[int, float]:
    make_working_copy(run.source, live)
    buf = np.memmap(live, dtype=np.uint8, mode="r+")
    slots = [TensorSlot(t.name, t.ggml_type, t.offset, t.n_elements) for t in model.trainable]
    space = CodeSpace(buf, slots, run.settings.sigma)
    store = SidecarResidual(live.with_suffix(".residual"), model.header_sha256, space.n_codes)
    stepped, start = 0, time.perf_counter()
    for t in range(len(run.history)):
        stepped += store.update(space, run.history[:t + 1], run.settings.decay)[0]
        if byte_residual:
            stochastic_round_to_byte(store.mapped(), t)
    buf.flush()
    del buf
    return stepped, time.perf_counter() - start


def heldout_accuracy(path: Path, run: Run, model) -> tuple[float, float, list[int]]:
    """Held-out accuracy of the GGUF at ``path``, scored as the run scores it (its prompt format included)."""
    with open_scorer(path, run.settings, model, run.base_file) as scorer:
        result = scorer.heldout()
    return result.accuracy, result.accuracy_se, result.correct


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--json", type=Path, default=Path("sidecar_precision.json"))
    args = parser.parse_args()
    run = Run.load(args.run_dir)
    if not run.settings.error_feedback:
        sys.exit("Error: the run has no error feedback, so no residual to compare")
    model = run.open_model()
    arms = {}
    with tempfile.TemporaryDirectory(prefix="qes-precision-", dir="/dev/shm") as tmp:
        lives = {}
        for name, byte_residual in (("16-bit", False), ("8-bit stochastic", True)):
            lives[name] = Path(tmp) / f"{name.split()[0]}.gguf"
            stepped, seconds = replay(run, model, lives[name], byte_residual)
            accuracy, se, correct = heldout_accuracy(lives[name], run, model)
            arms[name] = {"codes_stepped": stepped, "replay_s": round(seconds, 1), "heldout_accuracy": accuracy,
                          "heldout_se": se, "correct": correct}
        base_accuracy, base_se, _ = heldout_accuracy(run.source, run, model)
        a = np.memmap(lives["16-bit"], dtype=np.uint8, mode="r")
        b = np.memmap(lives["8-bit stochastic"], dtype=np.uint8, mode="r")
        bytes_differing = int(np.count_nonzero(a != b))
        del a, b
    wide, narrow = arms["16-bit"], arms["8-bit stochastic"]
    flipped = sum(x != y for x, y in zip(wide.pop("correct"), narrow.pop("correct")))
    print(f"run {args.run_dir}: {len(run.history)} updates, sigma {run.settings.sigma}, alpha {run.settings.alpha}, "
          f"decay {run.settings.decay}, held-out n = {run.settings.heldout}")
    print(f"{'residual':<18} {'codes stepped':>14} {'held-out accuracy':>18}")
    print(f"{'(base model)':<18} {'':>14} {base_accuracy:>11.3f} ± {base_se:.3f}")
    for name, arm in arms.items():
        print(f"{name:<18} {arm['codes_stepped']:>14,} {arm['heldout_accuracy']:>11.3f} ± {arm['heldout_se']:.3f}")
    print(f"bytes of the two models that differ: {bytes_differing:,}; held-out answers that differ: {flipped}")
    result = {"run_dir": str(args.run_dir), "updates": len(run.history), "sigma": run.settings.sigma,
              "alpha": run.settings.alpha, "decay": run.settings.decay, "heldout_n": run.settings.heldout,
              "base_accuracy": base_accuracy, "base_se": base_se, "arms": arms,
              "model_bytes_differing": bytes_differing, "heldout_answers_differing": flipped}
    args.json.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
