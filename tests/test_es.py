"""The ES math: seeds and prompts from (run seed, iteration), rewards to pair coefficients and integer weights."""

import math

import pytest

from qes_edge.errors import QesError
from qes_edge.es import SHAPINGS, iteration_batch, iteration_seeds, pair_weights, shape_rewards
from qes_edge.kernels import to_fixed
from qes_edge.settings import Settings, about
from qes_edge.tasks import load_task

pytestmark = pytest.mark.unit


def test_tscore_is_half_the_paired_t_statistic():
    # differences 1, 1, 0, 0: mean 1/2, sample sd sqrt(1/3), standard error sqrt(1/12)
    (c,) = shape_rewards([[1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 0.0, 0.0]], "tscore")
    assert c == pytest.approx(0.5 / math.sqrt(1 / 12) / 2)


def test_tscore_mirrors_and_clips():
    plus, minus = [[0.3, 1.0, 0.0, 0.1]], [[0.0, 0.2, 0.0, 0.1]]
    assert shape_rewards(minus, plus, "tscore") == [-c for c in shape_rewards(plus, minus, "tscore")]
    assert shape_rewards([[0.3] * 8], [[0.0] * 8], "tscore") == [3.0]  # every prompt better by the same
    assert shape_rewards([[0.5] * 8], [[0.5] * 8], "tscore") == [0.0]  # nothing moved: no step


def test_tscore_weighs_pairs_by_evidence_not_by_rank_among_pairs():
    # One prompt of sixteen changed: weak evidence stays weak even when the other pairs are flat,
    # where zscore would make it the full unit step.
    plus = [[1.0] + [0.0] * 15, [0.0] * 16]
    minus = [[0.0] * 16, [0.0] * 16]
    weak, flat = shape_rewards(plus, minus, "tscore")
    assert weak == pytest.approx(0.5) and flat == 0.0  # t = 1: half a unit
    assert shape_rewards(plus, minus, "zscore") == [pytest.approx(math.sqrt(2)), 0.0]


def test_zscore_and_rank_use_candidate_means():
    plus, minus = [[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 1.0]]
    assert shape_rewards(plus, minus, "zscore") == [pytest.approx(1.0), pytest.approx(-1.0)]
    ranks = shape_rewards(plus, minus, "rank")
    assert ranks[0] == pytest.approx(-ranks[1]) and ranks[0] > 0


def test_weights_are_fixed_point_alpha_c_over_n_sigma():
    weights = pair_weights([1.0, -0.5], alpha=0.02, sigma=0.005, population=8)
    assert weights.tolist() == [to_fixed(0.02 / (8 * 0.005)), to_fixed(-0.01 / (8 * 0.005))]


def test_seeds_and_prompts_are_fixed_functions_of_run_seed_and_iteration():
    # Part of the determinism contract: a resumed run, a fleet worker and another release draw these.
    assert iteration_seeds(0, 0, 4).tolist() == [1090522445607515610, 911932938550560312, 4067810467972011148,
                                                 3393757946643918380]
    assert iteration_seeds(7, 3, 2).tolist() == [1106606732537020637, 1790023754481476513]
    assert iteration_seeds(0, 1, 4).tolist() != iteration_seeds(0, 0, 4).tolist()
    task = load_task("arithmetic")
    assert [item.meta for item in iteration_batch(task, 0, 0, 2)] == [{"a": 6, "op": "*", "b": 9},
                                                                      {"a": 7, "op": "-", "b": 3}]
    assert iteration_batch(task, 0, 0, len(task.train) + 1) == task.train  # a batch past the task: all of it


def test_every_shaping_a_run_may_name_exists():
    assert set(about("shaping").check.choices) == set(SHAPINGS)


def test_tscore_needs_two_prompts():
    with pytest.raises(QesError, match="--batch 2"):
        Settings(shaping="tscore", batch=1).check()
    Settings(shaping="zscore", batch=1).check()
