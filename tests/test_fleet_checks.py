"""What a fleet checks without Ray running: replicas that must agree, options that go together.

Kept apart from test_fleet.py, which imports Ray: the unit tier imports no Ray.
"""

import pytest
from click.testing import CliRunner

from qes_edge.cli import cli
from qes_edge.errors import QesError
from qes_edge.fleet import agreed_weights


@pytest.mark.unit
def test_replicas_that_disagree_stop_the_run_with_a_clear_error():
    hosts = {0: "pi-1", 1: "pi-2"}
    assert agreed_weights({0: "ab" * 32, 1: "ab" * 32}, hosts, "after iteration 3") == "ab" * 32
    with pytest.raises(QesError, match=r"replicas disagree after iteration 4 \(worker 0 on pi-1: .*worker 1 on pi-2"):
        agreed_weights({0: "ab" * 32, 1: "cd" * 32}, hosts, "after iteration 4")


@pytest.mark.unit
def test_workers_without_ray_is_refused(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--workers", "2", "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: --workers goes with --ray"
    assert not (tmp_path / "run").exists()
