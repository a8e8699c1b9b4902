"""The cases of scripts/check_aarch64.sh, and the comparison: do the kernels built for aarch64 give the x86 bytes?

    python scripts/check_aarch64.py --driver HOST_DRIVER --aarch64-driver DRIVER --runner "qemu-aarch64 -L ..."

For every trainable format and a few sigmas it builds a code space of random
valid blocks (tests/blocks.py) and writes the space's own tables (the
CodeSpace's layout, tensor table and noise table: what the library uses) with
a list of operations: stacked perturbations and their restores, then updates
with the stored residual (sidecar), with replay, without error feedback, and
with weights whose sums overflow int64.  The two builds of
native/check_driver.c run each case; their outputs (after every operation:
the counts, the bytes, the gating bits, the residual) must be the same bytes,
and the host build's must be what the library gives through CodeSpace.

The last line printed is JSON: ``formats_identical`` and ``formats_differing``
(format names), with the case and operation counts.  Exit status 0 when every
format is identical.
"""

from __future__ import annotations

import argparse
import json
import shlex
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # blocks.py: valid random blocks of every trainable format

from blocks import ALL, make_space  # noqa: E402

from qes_edge.kernels import CodeSpace, native, support_seed, to_fixed  # noqa: E402
from qes_edge.kernels.noise import CHUNK, GUIDE_BITS  # noqa: E402
from qes_edge.kernels.update import FRACTION_BITS  # noqa: E402

SIGMAS = [0.005, 0.3, 1.5]  # the default; one where many codes move; one where gating at the edges is common
PERTURB_SEEDS = [3, -3, 1, 2**63 - 1, -(2**63)]  # 1 and -2**63: the edges of |seed| (0 is "no seed")
SUPPORTS = [11, 2**63 - 1, -(2**63), 5, 11]  # the support seed each perturbation uses (any int64 is valid)
ROWS, PAIRS, THREADS = 6, 4, 2
PERTURB, UPDATE, RESET = 0, 1, 2


def operations() -> list[tuple]:
    """(kind, a, b, c, stored, gamma): what the driver does, in order (see native/check_driver.c).

    A perturbation is (PERTURB, seed taken off, seed put on, support, 0, 0), 0 for no seed; an update
    (UPDATE, first row, end row, feedback, stored, gamma).
    """
    ops = [(PERTURB, 0, s, u, 0, 0.0) for s, u in zip(PERTURB_SEEDS, SUPPORTS)]
    ops += [(PERTURB, s, 0, u, 0, 0.0) for s, u in reversed(list(zip(PERTURB_SEEDS, SUPPORTS)))]
    ops += [(RESET, 0, 0, 0, 0, 0.0), (PERTURB, 0, 5, 11, 0, 0.0), (PERTURB, 5, -9, 11, 0, 0.0),
            (PERTURB, -9, 0, 11, 0, 0.0)]  # perturb, swap to the next candidate, restore
    ops += [(RESET, 0, 0, 0, 0, 0.0)] + [(UPDATE, t, t + 1, 1, 1, 0.9) for t in range(4)]  # sidecar
    ops += [(RESET, 0, 0, 0, 0, 0.0)] + [(UPDATE, max(0, t - 2), t + 1, 1, 0, 0.9) for t in range(4)]  # replay, K=2
    ops += [(RESET, 0, 0, 0, 0, 0.0)] + [(UPDATE, t, t + 1, 0, 0, 0.5) for t in range(2)]  # no error feedback
    ops += [(RESET, 0, 0, 0, 0, 0.0)] + [(UPDATE, t, t + 1, 1, 1, 1.0) for t in (4, 5)]  # int64 wrap-around
    ops += [(UPDATE, 3, 6, 1, 0, 0.3)]
    return ops


def history(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Seeds and weights [ROWS, PAIRS]; rows 4 and 5 have weights near 2**62, whose sums overflow."""
    seeds = rng.integers(-(2**62), 2**62, size=(ROWS, PAIRS), dtype=np.int64)
    weights = rng.integers(-40_000, 40_000, size=(ROWS, PAIRS), dtype=np.int64)
    weights[4:] = rng.integers(-(2**62), 2**62, size=(2, PAIRS), dtype=np.int64)
    weights[rng.random((ROWS, PAIRS)) < 0.1] = 0  # zero weights are skipped: exercise that too
    return seeds, weights


# ---- the files: runs of named arrays -------------------------------------------------------------------

def record(name: str, array) -> bytes:
    array = np.ascontiguousarray(array)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    return name.encode().ljust(16, b"\0") + struct.pack("<qq", array.itemsize, array.size) + array.tobytes()


def records(data: bytes) -> list[tuple[str, bytes]]:
    """(name, raw bytes) of each array in a file written by :func:`record` or the driver."""
    out, at = [], 0
    while at < len(data):
        name = data[at:at + 16].rstrip(b"\0").decode()
        size, count = struct.unpack_from("<qq", data, at + 16)
        at += 32
        out.append((name, data[at:at + size * count]))
        at += size * count
    return out


def case_file(space: CodeSpace, residual: np.ndarray, seeds, weights, ops) -> bytes:
    layout, table, noise = space.layout, space.table, space.noise
    arrays = {
        "constants": np.array([native.ABI_VERSION, CHUNK, GUIDE_BITS, FRACTION_BITS], np.int64),
        "low_byte": layout.low_byte, "low_shift": layout.low_shift, "high_byte": layout.high_byte,
        "high_shift": layout.high_shift, "params": layout.params,
        "width": np.array([layout.low_byte.shape[1]], np.int64),
        "keys": table.keys, "info": table.info, "chunks": table.chunks,
        "gap_tail": noise.gap_tail, "guide": noise.guide, "magnitude_tail": noise.magnitude_tail,
        "buf": space.buf, "gated": space.gated, "residual": residual,
        "seeds": seeds, "weights": weights, "pairs": np.array([PAIRS], np.int64),
        "supports": np.array([support_seed(row) for row in seeds], np.int64),
        "ops": np.array([(k, a, b, f, s, to_fixed(g)) for k, a, b, f, s, g in ops], np.int64),
        "threads": np.array([THREADS], np.int64),
    }
    return b"".join(record(name, array) for name, array in arrays.items())


def library_output(space: CodeSpace, residual: np.ndarray, seeds, weights, ops) -> tuple[bytes, dict]:
    """What the driver must write: the same operations through the library's CodeSpace (modifies space)."""
    start_buf, start_residual = space.buf.copy(), residual.copy()
    out, totals = [], {"changed": 0, "stepped": 0, "blocked": 0}
    for kind, a, b, c, stored, gamma in ops:
        result = (0, 0)
        if kind == PERTURB:
            result = (space.swap(a, b, c), 0)
            totals["changed"] += result[0]
        elif kind == UPDATE:
            result = space.update(seeds[a:b], weights[a:b], gamma, bool(c), residual if stored else None)
            totals["stepped"] += result[0]
            totals["blocked"] += result[1]
        else:
            space.buf[:], residual[:] = start_buf, start_residual
            space.gated[:] = 0
        out += [record("result", np.array(result, np.int64)), record("buf", space.buf),
                record("gated", space.gated), record("residual", residual)]
    return b"".join(out), totals


def first_difference(want: bytes, got: bytes, ops) -> str:
    """Where two outputs part: the operation and the array."""
    want_records, got_records = records(want), records(got)
    for i, (w, g) in enumerate(zip(want_records, got_records)):
        if w != g:
            kind, a, b, feedback, stored, _ = ops[i // 4]
            what = {PERTURB: f"swap({a} -> {b})",
                    UPDATE: f"update(rows {a}..{b - 1}, feedback={feedback}, stored={stored})",
                    RESET: "reset"}[kind]
            return f"operation {i // 4} {what}: {w[0]} differs"
    return f"{len(got_records)} arrays instead of {len(want_records)}"


def run_driver(command: list[str], case: Path, out: Path) -> bytes:
    done = subprocess.run(command + [str(case), str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"check_aarch64: {' '.join(command)} failed: {done.stderr.strip() or done.returncode}")
    return out.read_bytes()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--driver", required=True, help="qes_check_driver built for this machine")
    parser.add_argument("--aarch64-driver", required=True, help="qes_check_driver built for aarch64")
    parser.add_argument("--runner", default="", help="how to run an aarch64 program here (e.g. qemu-aarch64 -L ...)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    host, arm = [args.driver], shlex.split(args.runner) + [args.aarch64_driver]
    ops = operations()
    identical, differing, driver_bugs, kernels = [], [], [], None
    with tempfile.TemporaryDirectory(prefix="qes-check-aarch64-") as tmp:
        tmp = Path(tmp)
        for index, qtype in enumerate(ALL):
            problems, totals = [], {"changed": 0, "stepped": 0, "blocked": 0}
            for s, sigma in enumerate(SIGMAS):
                rng = np.random.default_rng([index, s])
                space = make_space([qtype], sigma, seed=index * 10 + s)
                kernels = space.kernels
                residual = rng.integers(-(1 << 14), 1 << 14, size=space.n_codes).astype(np.int16)
                seeds, weights = history(rng)
                case = tmp / f"{qtype.name}-{s}.case"
                case.write_bytes(case_file(space, residual, seeds, weights, ops))
                want, counts = library_output(space, residual, seeds, weights, ops)
                totals = {k: totals[k] + counts[k] for k in totals}
                x86 = run_driver(host, case, tmp / "host.out")
                if x86 != want:
                    driver_bugs.append(f"{qtype.name} sigma {sigma}: {first_difference(want, x86, ops)}")
                got = run_driver(arm, case, tmp / "aarch64.out")
                if got != x86:
                    problems.append(f"sigma {sigma}: {first_difference(x86, got, ops)}")
            if not all(totals.values()):  # a check that moved nothing would prove nothing
                idle = ", ".join(k for k, v in totals.items() if not v)
                driver_bugs.append(f"{qtype.name}: no code {idle} (the check would prove nothing)")
            (differing if problems else identical).append(qtype.name)
            print(f"{qtype.name:<5} {'identical' if not problems else 'DIFFERS: ' + '; '.join(problems)}  "
                  f"({totals['changed']} codes perturbed and restored, {totals['stepped']} stepped, "
                  f"{totals['blocked']} blocked)")
    for line in driver_bugs:
        print(f"the host driver disagrees with the library ({kernels} kernels): {line}")
    print(json.dumps({"formats_identical": identical, "formats_differing": differing,
                      "cases": len(ALL) * len(SIGMAS), "operations_per_case": len(ops),
                      "driver_matches_library": not driver_bugs, "library_kernels": kernels,
                      "seconds": round(time.perf_counter() - started, 1)}))
    return 0 if not differing and not driver_bugs else 1


if __name__ == "__main__":
    sys.exit(main())
