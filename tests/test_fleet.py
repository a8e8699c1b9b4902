"""`qes-edge train --ray` on a local Ray instance with two workers, against the single-process run.

Each run is its own `python -m qes_edge` process (Ray's workers are processes too),
on a JSONL task with a reward module the workers import from its path.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from helpers import sha256, tiny_options

SETTINGS = tiny_options(iterations=3, population=4, heldout=4, eval_every=3, threads=None, seed=5)


@pytest.fixture(scope="module", autouse=True)
def ray_installed():
    """Imported here, not at collection, so that the unit tier imports no Ray."""
    import ray  # noqa: F401  (the test extra installs it; a missing Ray fails here, not as a skip)


def train(workspace, model, run_dir, *args, env=None):
    command = [sys.executable, "-m", "qes_edge", "train", str(model), "--task", str(workspace / "data.jsonl"),
               "--reward", f"{workspace / 'rewards_for_tests.py'}:score", *SETTINGS, "--run-dir", str(run_dir),
               "--out", str(run_dir / "out.gguf"), *args]
    result = subprocess.run(command, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return sha256(run_dir / "out.gguf"), lines


@pytest.fixture(scope="module")
def single_process(workspace, default_model, tmp_path_factory):
    return train(workspace, default_model, tmp_path_factory.mktemp("single") / "run")


def rewards(lines):
    return [(m["rewards_plus"], m["rewards_minus"], m["weights"]) for m in lines if "weights" in m]


def test_two_workers_give_the_single_process_bytes(workspace, default_model, single_process, tmp_path):
    digest, lines = train(workspace, default_model, tmp_path / "run", "--ray", "--workers", "2", "--threads", "1")
    assert digest == single_process[0]
    assert rewards(lines) == rewards(single_process[1])
    steps = [m for m in lines if "weights" in m]
    assert any(m["codes_stepped"] for m in steps)  # the run really moved codes
    assert all(m["workers"] == 2 and m["workers_replaced"] == 0 for m in steps)
    assert all(0 < m["bytes_sent"] < 10_000 for m in steps)  # seeds and rewards, never weights
    assert len({m["weights_sha256"] for m in steps}) == len(steps)  # the replicas' weights changed every iteration
    held = [m["heldout"] for m in lines if "heldout" in m]
    assert held == [m["heldout"] for m in single_process[1] if "heldout" in m]


def test_a_worker_killed_mid_iteration_is_replaced_and_the_result_is_the_same(
        workspace, default_model, single_process, tmp_path):
    # Worker 0 SIGKILLs itself after scoring its second candidate, before replying: iteration 1, mid-way.
    before = set(Path("/dev/shm").glob("qes-edge-*")) | set(Path(tempfile.gettempdir()).glob("qes-edge-worker-*"))
    digest, lines = train(workspace, default_model, tmp_path / "run", "--ray", "--workers", "2", "--threads", "1",
                          env={"QES_EDGE_WORKER_CRASH_AT": "0:evaluate:2"})
    assert digest == single_process[0]
    assert sum(m.get("workers_replaced", 0) for m in lines) == 1
    assert all(m["workers"] == 2 for m in lines if "weights" in m)
    after = set(Path("/dev/shm").glob("qes-edge-*")) | set(Path(tempfile.gettempdir()).glob("qes-edge-worker-*"))
    assert after - before == set()  # the dead worker's working copy is removed, the live ones released
