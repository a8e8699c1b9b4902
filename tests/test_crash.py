"""Crash and resume: SIGKILL a real training run anywhere, resume it, get the uninterrupted run's bytes.

Run alone with ``pytest -m crash``.  Each trial starts `python -m qes_edge train`
as a subprocess and kills it with SIGKILL, either at a named point
(``QES_EDGE_CRASH_AT``, see qes_edge/faults.py: while perturbed, after scoring a
candidate, inside and after the update, between writing a checkpoint file and
renaming it, between writing the exported GGUF and renaming it) or after a
random delay.  Then ``--resume`` (or, when the kill came before the run
directory held a checkpoint, the same command again) must finish with an output
GGUF whose sha256 is the uninterrupted run's, and the source model's sha256
must never change.  The trials are drawn from a seeded RNG, so a failure
reproduces.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import sha256, tiny_options
from qes_edge.faults import POINTS
from qes_edge.working_copy import boot_id

pytestmark = pytest.mark.crash

# --force: 4 tokens cut most replies short of "The answer is N", and the first rewards may all be 0
# (the no-signal check would stop the run before the crash points are reached).
SETTINGS = tiny_options(iterations=3, threads=1, seed=7, force=True)
POINT_TRIALS = 2  # per crash point
TIMED_TRIALS = 10
RNG_SEED = 20261123


def qes_edge(args: list[str], crash_at: str | None = None, kill_after: float | None = None):
    env = {k: v for k, v in os.environ.items() if k != "QES_EDGE_CRASH_AT"}
    if crash_at:
        env["QES_EDGE_CRASH_AT"] = crash_at
    process = subprocess.Popen([sys.executable, "-m", "qes_edge", *args], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    if kill_after is not None:
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


def train_command(model: Path, run_dir: Path, out: Path) -> list[str]:
    return ["train", str(model), *SETTINGS, "--run-dir", str(run_dir), "--out", str(out)]


@pytest.fixture(scope="module")
def uninterrupted(default_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    started = time.perf_counter()
    code, output = qes_edge(train_command(default_model, root / "run", root / "tuned.gguf"))
    assert code == 0, output
    return sha256(root / "tuned.gguf"), time.perf_counter() - started


def trials() -> list[tuple[str, str | None, float | None]]:
    rng = random.Random(RNG_SEED)
    # How often each point is reached in the run above (at least): 3 iterations x 2 candidates,
    # 3 updates, checkpoints: state.json at creation, metrics truncation, state.json when the working
    # copy is placed, the live.unsynced marker, 3 iterations' state.json.
    reached = {"perturb": 6, "evaluate": 6, "residual": 3, "update": 3, "checkpoint": 7, "export": 1}
    planned = [(f"{point}:{rng.randint(1, reached[point])}", f"{point}", None)
               for point in POINTS for _ in range(POINT_TRIALS)]
    planned += [(f"timed:{i}", None, rng.random()) for i in range(TIMED_TRIALS)]
    return planned


@pytest.mark.parametrize("label, point, fraction", trials(), ids=[t[0] for t in trials()])
def test_killed_run_resumes_to_the_same_bytes(label, point, fraction, uninterrupted, default_model, tmp_path):
    expected, seconds = uninterrupted
    source_before = sha256(default_model)
    run_dir, out = tmp_path / "run", tmp_path / "tuned.gguf"
    command = train_command(default_model, run_dir, out)
    if point:
        code, output = qes_edge(command, crash_at=label)
        assert code == -signal.SIGKILL, f"the run was not killed at {label}:\n{output}"
    else:
        code, output = qes_edge(command, kill_after=1.0 + fraction * seconds)
        assert code in (0, -signal.SIGKILL), output

    if (run_dir / "state.json").exists():
        code, output = qes_edge(["train", "--resume", str(run_dir), "--out", str(out)])
    else:  # killed before the first checkpoint: the user runs the same command again
        code, output = qes_edge(command)
    assert code == 0, output
    assert sha256(out) == expected
    assert sha256(default_model) == source_before
    assert not list(tmp_path.glob("tuned.gguf.tmp*")), "a killed export left its temporary file behind"


def test_a_working_copy_left_unsynced_in_another_boot_is_rebuilt(uninterrupted, default_model, tmp_path):
    """Updates are not synced every iteration, so after a power loss the disk may hold a working copy
    without its last writes, and without the live.dirty marker that says so; the boot id tells."""
    run_dir, out = tmp_path / "run", tmp_path / "tuned.gguf"
    code, output = qes_edge(train_command(default_model, run_dir, out), crash_at="evaluate:3")
    assert code == -signal.SIGKILL, output
    assert (run_dir / "live.unsynced").read_text() == boot_id()  # killed while training: never synced
    live = Path(json.loads((run_dir / "state.json").read_text())["live"])
    (run_dir / "live.dirty").unlink()  # the machine went down: the marker's removal reached the disk...
    with open(live, "r+b") as f:  # ...and some of the copy's pages did not
        f.seek(live.stat().st_size // 2)
        f.write(bytes(1 << 16))
    (run_dir / "live.unsynced").write_text("0f0e0d0c-an-earlier-boot")
    code, output = qes_edge(["train", "--resume", str(run_dir), "--out", str(out)])
    assert code == 0, output
    assert sha256(out) == uninterrupted[0]
    assert not (run_dir / "live.unsynced").exists()  # this time it closed, and synced


def test_a_finished_run_releases_its_working_copy(uninterrupted, default_model, tmp_path):
    run_dir = tmp_path / "run"
    code, output = qes_edge(train_command(default_model, run_dir, tmp_path / "a.gguf"))
    assert code == 0, output
    assert json.loads((run_dir / "state.json").read_text())["live"] is None
    code, output = qes_edge(["export", str(run_dir), "--out", str(tmp_path / "b.gguf")])
    assert code == 0, output
    assert sha256(tmp_path / "a.gguf") == sha256(tmp_path / "b.gguf") == uninterrupted[0]
    assert json.loads((run_dir / "state.json").read_text())["live"] is None  # rebuilt in a temporary place


def test_a_run_killed_within_an_iteration_scores_only_the_candidates_it_had_not(uninterrupted, default_model,
                                                                                  tmp_path):
    """Each candidate's rewards are kept as it is scored: a resume scores the others, to the same bytes."""
    run_dir, out = tmp_path / "run", tmp_path / "tuned.gguf"
    # one replica, 2 candidates an iteration: the 3rd perturbation is iteration 2's first candidate, the 4th
    # its second
    command = ["train", str(default_model), *SETTINGS, "--parallel", "1", "--run-dir", str(run_dir), "--out", str(out)]
    code, output = qes_edge(command, crash_at="perturb:4")
    assert code == -signal.SIGKILL, output
    state = json.loads((run_dir / "state.json").read_text())
    kept = json.loads((run_dir / "scored.json").read_text())
    assert state["iteration"] == kept["iteration"] == 1
    assert [row[:2] for row in kept["rewards"]] == [[0, 1]]  # the first candidate of the iteration under way
    # 3 perturbations remain (iteration 2's second candidate, iteration 3's two); a 4th would be a re-score
    code, output = qes_edge(["train", "--resume", str(run_dir), "--out", str(out)], crash_at="perturb:4")
    assert code == 0, output
    assert sha256(out) == uninterrupted[0]
    assert not (run_dir / "scored.json").exists()
