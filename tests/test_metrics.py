"""metrics.jsonl as typed records: what is read back is written again to the same bytes."""

import json
from pathlib import Path

import pytest

from qes_edge.metrics import FleetReport, HeldOut, MetricsLine, Sample, Step
from qes_edge.run import read_metrics

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("run", sorted((Path(__file__).parents[1] / "benchmarks" / "long-runs").glob("*/run")))
def test_committed_metrics_read_and_write_back_to_the_same_bytes(run):
    text = (run / "metrics.jsonl").read_text()
    lines = read_metrics(run)
    assert len(lines) == len(text.splitlines()) > 1 and any(m.heldout for m in lines) and any(m.step for m in lines)
    assert "".join(json.dumps(m.to_json()) + "\n" for m in lines) == text


def test_a_line_keeps_the_key_order_and_the_nulls_it_has_always_had():
    heldout = HeldOut(2, 0.5, 0.35, 0.25, 0.1, [1, 0], [0.5, 0.0], [Sample("q", "a", "c", 0.5, True)])
    line = MetricsLine(3, Step(0.1, 0.2, [0.1], [0.2], [7], None, None, 1.0, 0.1), heldout,
                       FleetReport(123, 2, 0, None), 1.5)
    assert list(line.to_json()) == ["iteration", "reward_mean", "reward_max", "rewards_plus", "rewards_minus",
                                    "weights", "codes_stepped", "steps_blocked", "score_s", "update_s", "heldout",
                                    "bytes_sent", "workers", "workers_replaced", "weights_sha256", "iteration_s"]
    assert line.to_json()["codes_stepped"] is None and line.to_json()["weights_sha256"] is None
    assert MetricsLine.from_json(json.loads(json.dumps(line.to_json()))) == line
    old = {"iteration": 0, "heldout": {"n": 1, "accuracy": 1.0, "accuracy_se": 0.0, "reward": 1.0, "reward_se": 0.0}}
    assert MetricsLine.from_json(old).to_json() == old  # a result from before verdicts and samples were kept
