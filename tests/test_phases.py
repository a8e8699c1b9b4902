"""The phases the library marks: what bench_iteration reads instead of wrapping package methods."""

import pytest

from helpers import invoke, tiny_options
from qes_edge import phases


@pytest.mark.unit
def test_timed_counts_calls_and_seconds_and_tells_listeners():
    phases.reset()
    heard = []
    phases.listeners.append(heard.append)
    try:
        with phases.timed(phases.UPDATE):
            sum(i * i for i in range(200_000))  # CPU work: counted as the phase's CPU time

        @phases.timed(phases.PERTURB)
        def walk():
            return 7

        assert walk() == 7 and walk() == 7
    finally:
        phases.listeners.remove(heard.append)
    assert phases.calls()[phases.UPDATE] == 1 and phases.calls()[phases.PERTURB] == 2
    assert phases.calls()[phases.SYNC] == 0 and set(phases.seconds()) == set(phases.PHASES)
    assert heard == [phases.UPDATE, phases.PERTURB, phases.PERTURB]
    assert phases.cpu_seconds()[phases.UPDATE] > 0 and phases.cpu_seconds()[phases.SYNC] == 0
    with pytest.raises(ValueError, match="unknown phase"):
        with phases.timed("inferenc"):
            pass


def test_a_run_marks_every_phase_of_an_iteration(default_model, tmp_path):
    phases.reset()
    result = invoke("train", default_model, *tiny_options(), "--run-dir", tmp_path / "run",
                    "--out", tmp_path / "out.gguf")
    assert result.exit_code == 0, result.output
    calls = phases.calls()
    # 2 iterations of one mirrored pair: 4 candidates scored, each perturbed and restored by swaps;
    # 2 updates, each checkpointed; held-out at 0 and at the end.
    assert calls[phases.INFERENCE] == 4
    assert calls[phases.PERTURB] >= 4
    assert calls[phases.UPDATE] == 2 and calls[phases.CHECKPOINT] >= 2
    assert calls[phases.METRICS] == 3 and calls[phases.HELDOUT] == 2


def test_progress_comes_with_every_candidate_and_every_group_of_held_out_items(default_model, tmp_path):
    """An iteration of a large model takes minutes: the run says where it is within one."""
    from helpers import TINY
    from qes_edge import api
    from qes_edge.settings import Settings

    seen = []
    training = api.start(default_model, Settings(**{**TINY, "heldout": 3}), run_dir=tmp_path / "run",
                         out=tmp_path / "out.gguf", replicas=1)
    api.train(training, seen.append)
    assert [(p.iteration, p.candidates) for p in seen if p.candidates] == [(0, 1), (0, 2), (1, 1), (1, 2)]
    # held-out items are judged two at a time (the batch): at iteration 0 and at the end
    assert [(p.iteration, p.judged) for p in seen if p.judged] == [(0, (2, 3)), (0, (3, 3)), (2, (2, 3)), (2, (3, 3))]
    assert [p.iteration for p in seen if not p.candidates and not p.judged] == [1, 2]
