"""Several replicas in one process (``--parallel``): the bytes, rewards and held-out results of one replica.

Each run is its own `python -m qes_edge` process, so that one can be killed
mid-iteration (``QES_EDGE_CRASH_AT``, qes_edge/faults.py) and resumed.  The
held-out set (5 items, waves of 2) ends in a short wave, and every iteration
is evaluated.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import sha256, tiny_options

SETTINGS = tiny_options(iterations=3, population=4, heldout=5, eval_every=1, threads=1, seed=11, force=True)


def qes_edge(*args, crash_at=None):
    env = {k: v for k, v in os.environ.items() if k != "QES_EDGE_CRASH_AT"}
    if crash_at:
        env["QES_EDGE_CRASH_AT"] = crash_at
    return subprocess.run([sys.executable, "-m", "qes_edge", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=900)


def train(model, run_dir: Path, *args, crash_at=None):
    return qes_edge("train", model, *SETTINGS, "--run-dir", run_dir, "--out", run_dir / "out.gguf", *args,
                    crash_at=crash_at)


def outcome(run_dir: Path):
    """The tuned GGUF's sha256, and every metrics line without its timings."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timings = {"score_s", "update_s", "iteration_s"}
    return (sha256(run_dir / "out.gguf"),
            [{k: v for k, v in line.items() if k not in timings} for line in lines])


def mirrors(*where: Path) -> list[Path]:
    return [m for directory in where for m in directory.glob("mirror-*.gguf")]


def live_dir(run_dir: Path) -> Path:
    """Where the run's working copy (and so its mirrors) is: /dev/shm or the run directory."""
    return Path(json.loads((run_dir / "state.json").read_text())["live"]).parent


@pytest.fixture(scope="module")
def one_replica(default_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    result = train(default_model, run_dir, "--parallel", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    return outcome(run_dir)


def test_three_replicas_give_one_replicas_bytes_rewards_and_heldout(default_model, one_replica, tmp_path):
    run_dir = tmp_path / "run"
    result = train(default_model, run_dir, "--parallel", "3")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 replicas x 1 thread" in result.stdout
    digest, lines = outcome(run_dir)
    assert lines == one_replica[1]  # rewards of every candidate, weights, held-out verdicts and samples
    assert digest == one_replica[0]
    assert any(line.get("codes_stepped") for line in lines)  # the run really moved codes
    assert json.loads((run_dir / "state.json").read_text())["live"] is None  # released, mirrors with it
    assert not mirrors(run_dir)


def test_a_parallel_run_killed_mid_iteration_resumes_to_the_same_bytes(default_model, one_replica, tmp_path):
    run_dir = tmp_path / "run"
    killed = train(default_model, run_dir, "--parallel", "2", crash_at="evaluate:7")  # in iteration 2
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    where = live_dir(run_dir)
    assert mirrors(where)  # killed with its mirror open
    resumed = qes_edge("train", "--resume", run_dir, "--out", run_dir / "out.gguf")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert outcome(run_dir)[0] == one_replica[0]
    assert not mirrors(where, run_dir)  # the finished run released its copy and the mirror the killed one left


def test_a_reward_that_raises_on_another_replica_stops_the_run_in_one_line(workspace, default_model, tmp_path):
    run_dir = tmp_path / "run"
    result = qes_edge("train", default_model, "--task", workspace / "data.jsonl", "--reward",
                      f"{workspace / 'rewards_for_tests.py'}:explode", *SETTINGS, "--parallel", "2",
                      "--run-dir", run_dir)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output
    assert [line for line in output.splitlines() if line.startswith("Error: ")] == [output.strip().splitlines()[-1]]
    assert "boom" in output
    assert not (run_dir / "live.dirty").exists()  # every replica restored its candidate
    assert json.loads((run_dir / "state.json").read_text())["live"] is None  # released, mirrors with it


def test_parallel_with_ray_is_refused_in_one_line(default_model, tmp_path):
    from helpers import invoke, one_line_error

    line = one_line_error(invoke("train", default_model, "--ray", "--parallel", "2", "--run-dir", tmp_path / "r"))
    assert "--parallel goes without --ray" in line
