"""The C kernels against their Numba twins: the same positions, signs, bytes, residuals and counts.

Skipped when the native library is not built (CI builds it); the selection
tests at the end run either way.
"""

import logging

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blocks import ALL, make_space
from qes_edge.errors import QesError
from qes_edge.kernels import CodeSpace, NoiseTable, Update, native, sample_tensor, support_seed, tensor_key, to_fixed

pytestmark = pytest.mark.unit

UNAVAILABLE = native.unavailable_reason()
needs_native = pytest.mark.skipif(UNAVAILABLE is not None, reason=f"native kernels not built: {UNAVAILABLE}")

SIGMAS = [1e-5, 0.001, 0.01, 0.2, 1.5, 4.0]  # 1e-5: most gaps run past the gap table; 4.0: long magnitude table
NOISE = {sigma: NoiseTable.for_sigma(sigma) for sigma in SIGMAS}
SEEDS = [1, -1, 2, 7, -12345, 2**63 - 1, -(2**63), -(2**63) + 1]  # 1 and -2**63: the edges of |seed| (0: none)
SUPPORT = 987654321


def twins(qtypes, sigma, seed=0):
    """The same buffer and tensors under each kernel set (separate copies of the bytes)."""
    base = make_space(qtypes, sigma, seed=seed)
    return (CodeSpace(base.buf.copy(), base.tensors, sigma, kernels="native"),
            CodeSpace(base.buf.copy(), base.tensors, sigma, kernels="numba"))


def assert_same(c_space, numba_space):
    assert np.array_equal(c_space.buf, numba_space.buf)
    assert np.array_equal(c_space.gated, numba_space.gated)


# ---- sampling ------------------------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("sigma", SIGMAS)
def test_sampled_positions_and_signs_are_identical(sigma):
    n = NOISE[sigma]
    size = 3_000_000 if sigma < 1e-3 else 200_000  # enough non-zeros at the sparsest sigma
    for seed in SEEDS:
        key = tensor_key(f"blk.{seed % 7}.ffn_up.weight")
        support = SUPPORT + seed % 5
        want = sample_tensor(seed, support, key, size, n)
        got = native.sample_tensor(seed, support, key, size, n)
        assert got[0].dtype == want[0].dtype and got[1].dtype == want[1].dtype
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


@needs_native
@settings(max_examples=60, deadline=None)
@given(seed=st.integers(-(2**63), 2**63 - 1), support=st.integers(-(2**63), 2**63 - 1),
       key=st.integers(0, 2**64 - 1), n_elements=st.integers(0, 40_000), sigma=st.sampled_from(SIGMAS))
def test_sampling_matches_for_any_seed_support_key_and_length(seed, support, key, n_elements, sigma):
    n = NOISE[sigma]
    key = np.uint64(key)
    want = sample_tensor(seed, support, key, n_elements, n)
    got = native.sample_tensor(seed, support, key, n_elements, n)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


# ---- apply and restore ---------------------------------------------------------------------------

@needs_native
@pytest.mark.parametrize("sigma", [0.001, 0.05, 0.4, 1.5, 4.0])
@pytest.mark.parametrize("qtypes", [[q] for q in ALL] + [ALL], ids=[q.name for q in ALL] + ["all"])
def test_apply_and_restore_give_identical_bytes(qtypes, sigma):
    c_space, numba_space = twins(qtypes, sigma, seed=len(qtypes))
    original = c_space.buf.copy()
    for seed in SEEDS[:5]:
        changed = c_space.perturb(seed, SUPPORT)
        assert changed == numba_space.perturb(seed, SUPPORT)
        assert_same(c_space, numba_space)
        assert c_space.restore(seed, SUPPORT) == numba_space.restore(seed, SUPPORT) == changed
        assert_same(c_space, numba_space)
        assert np.array_equal(c_space.buf, original) and not c_space.gated.any()


@needs_native
def test_stacked_perturbations_agree_step_by_step():
    """Gating depends on the bytes (and bits) earlier perturbations left; both sets must agree on each step."""
    c_space, numba_space = twins(ALL, 1.0, seed=9)
    seeds = [3, -3, 11]
    for seed in seeds:
        assert c_space.perturb(seed, SUPPORT) == numba_space.perturb(seed, SUPPORT)
        assert_same(c_space, numba_space)
    for seed in reversed(seeds):
        assert c_space.restore(seed, SUPPORT) == numba_space.restore(seed, SUPPORT)
        assert_same(c_space, numba_space)


@needs_native
@pytest.mark.parametrize("sigma", [0.05, 1.5])
def test_a_swap_is_a_restore_then_a_perturb_in_both_sets(sigma):
    """Going from one candidate to the next in one walk leaves the bytes and gating bits of the two steps."""
    c_space, numba_space = twins(ALL, sigma, seed=4)
    stepwise = make_space(ALL, sigma, seed=4)
    original = stepwise.buf.copy()
    for space in (c_space, numba_space, stepwise):
        assert space.perturb(SEEDS[0], SUPPORT) > 0
    for worn, seed in zip(SEEDS[:4], SEEDS[1:5]):
        stepwise.restore(worn, SUPPORT)
        changed = stepwise.perturb(seed, SUPPORT)
        assert c_space.swap(worn, seed, SUPPORT) == numba_space.swap(worn, seed, SUPPORT) == changed
        assert_same(c_space, numba_space)
        assert np.array_equal(c_space.buf, stepwise.buf) and np.array_equal(c_space.gated, stepwise.gated)
    assert c_space.restore(SEEDS[4], SUPPORT) == numba_space.restore(SEEDS[4], SUPPORT)
    assert np.array_equal(c_space.buf, original) and not c_space.gated.any() and not numba_space.gated.any()


# ---- the update ----------------------------------------------------------------------------------

def history_arrays(rng, rows, pairs, weight_bound):
    seeds = rng.integers(-(2**62), 2**62, size=(rows, pairs), dtype=np.int64)
    weights = rng.integers(-weight_bound, weight_bound, size=(rows, pairs), dtype=np.int64)
    weights[rng.random((rows, pairs)) < 0.1] = 0  # zero weights are skipped: exercise that too
    return seeds, weights


def run_updates(c_space, numba_space, mode, gamma, rng, iterations=4, pairs=4, weight_bound=40_000, window=3):
    """Several iterations of one residual mode; bytes, residuals and counts compared after each."""
    residuals = None
    if mode == "sidecar":
        start = rng.integers(-(1 << 14), 1 << 14, size=c_space.n_codes).astype(np.int16)
        residuals = start.copy(), start.copy()
    seeds, weights = history_arrays(rng, iterations, pairs, weight_bound)
    for t in range(iterations):
        if mode == "sidecar":
            rows, feedback = slice(t, t + 1), True
        elif mode == "replay":
            rows, feedback = slice(max(0, t - window), t + 1), True
        else:
            rows, feedback = slice(t, t + 1), False
        results = [space.update(seeds[rows], weights[rows], gamma, feedback, None if residuals is None else r)
                   for space, r in zip((c_space, numba_space), residuals or (None, None))]
        assert results[0] == results[1]
        assert np.array_equal(c_space.buf, numba_space.buf)
        if residuals is not None:
            assert residuals[0].tobytes() == residuals[1].tobytes()
    return results[0]


@needs_native
@pytest.mark.parametrize("gamma", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("mode", ["sidecar", "replay", "none"])
@pytest.mark.parametrize("qtypes", [[q] for q in ALL] + [ALL], ids=[q.name for q in ALL] + ["all"])
def test_update_gives_identical_bytes_residuals_and_counts(qtypes, mode, gamma):
    c_space, numba_space = twins(qtypes, 0.3, seed=len(qtypes) + 1)
    rng = np.random.default_rng([len(qtypes), int(gamma * 10), len(mode)])
    stepped, blocked = run_updates(c_space, numba_space, mode, gamma, rng)
    assert stepped > 0 and blocked > 0  # both paths of the range check were taken


@needs_native
def test_update_wraps_around_like_numba():
    """Weights near 2**62 overflow int64 sums: both sets must wrap the same way (and not crash)."""
    c_space, numba_space = twins(ALL, 0.5, seed=4)
    for mode in ("sidecar", "replay", "none"):
        run_updates(c_space, numba_space, mode, 0.9, np.random.default_rng(5), weight_bound=2**62)


@needs_native
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_update_matches_for_random_histories(data):
    qtypes = data.draw(st.lists(st.sampled_from(ALL), min_size=1, max_size=3, unique=True))
    sigma = data.draw(st.sampled_from([0.01, 0.2, 1.5]))
    mode = data.draw(st.sampled_from(["sidecar", "replay", "none"]))
    gamma = data.draw(st.sampled_from([0.0, 0.3, 0.9, 1.0]))
    c_space, numba_space = twins(qtypes, sigma, seed=data.draw(st.integers(0, 1000)))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    run_updates(c_space, numba_space, mode, gamma, rng, iterations=data.draw(st.integers(1, 5)),
                pairs=data.draw(st.integers(1, 6)), weight_bound=data.draw(st.sampled_from([100, 30_000, 10**6])),
                window=data.draw(st.integers(1, 4)))


# ---- threads ---------------------------------------------------------------------------------------

@needs_native
def test_native_results_do_not_depend_on_thread_count():
    space = make_space(ALL, 0.5, seed=12)
    seeds, weights = history_arrays(np.random.default_rng(1), 4, 6, 40_000)
    gamma_fx = np.int64(to_fixed(0.9))
    outcomes = []
    for threads in (1, 2, 3):
        buf, gated = space.buf.copy(), space.gated.copy()
        residual = np.zeros(space.n_codes, dtype=np.int16)
        tables = (space.layout, space.table, space.noise)
        changed = native.perturb_codes(buf, *tables, 0, 5, SUPPORT, gated, threads=threads)
        changed += native.perturb_codes(buf, *tables, 5, -7, SUPPORT, gated, threads=threads)  # a swap
        perturbed, perturbed_gated = buf.copy(), gated.copy()
        native.perturb_codes(buf, *tables, -7, 0, SUPPORT, gated, threads=threads)
        supports = np.array([support_seed(row) for row in seeds], dtype=np.int64)
        counts = [native.es_update(buf, *tables, Update(seeds[t:t + 1], supports[t:t + 1], weights[t:t + 1],
                                                        gamma_fx, True, True), residual, threads=threads)
                  for t in range(4)]
        counts.append(native.es_update(buf, *tables, Update(seeds, supports, weights, gamma_fx, True, False),
                                       residual, threads=threads))
        outcomes.append((changed, perturbed.tobytes(), perturbed_gated.tobytes(), counts, buf.tobytes(),
                         residual.tobytes()))
    assert outcomes[0] == outcomes[1] == outcomes[2]


# ---- choosing the kernel set -----------------------------------------------------------------------

@pytest.fixture
def fresh_selection():
    """Forget the loaded library and the fallback notice before and after the test."""
    native._library.cache_clear()
    native._notice_fallback.cache_clear()
    yield
    native._library.cache_clear()
    native._notice_fallback.cache_clear()


@needs_native
def test_the_environment_chooses_the_kernels(monkeypatch):
    space = make_space([ALL[0]], 0.1)
    monkeypatch.delenv(native.ENV, raising=False)
    assert CodeSpace(space.buf, space.tensors, 0.1).kernels == "native"  # built, so the default
    for choice in ("numba", "native", "NATIVE"):
        monkeypatch.setenv(native.ENV, choice)
        assert CodeSpace(space.buf, space.tensors, 0.1).kernels == choice.lower()
    assert CodeSpace(space.buf, space.tensors, 0.1, kernels="numba").kernels == "numba"  # the argument wins


def test_a_missing_library_falls_back_with_one_notice_or_fails_when_forced(monkeypatch, tmp_path, caplog,
                                                                          fresh_selection):
    monkeypatch.setattr(native, "LIBRARY_DIR", tmp_path)
    space = make_space([ALL[0]], 0.1)
    monkeypatch.delenv(native.ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger=native.__name__):
        assert CodeSpace(space.buf, space.tensors, 0.1).kernels == "numba"
        assert CodeSpace(space.buf, space.tensors, 0.1).kernels == "numba"
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "using the Numba kernels" in notices[0] and "\n" not in notices[0]
    assert "sudo apt install build-essential cmake" in notices[0]  # how to get them, on a Pi too
    monkeypatch.setenv(native.ENV, "native")
    with pytest.raises(QesError, match="native kernels requested but unavailable") as error:
        CodeSpace(space.buf, space.tensors, 0.1)
    assert "\n" not in str(error.value)
    monkeypatch.setenv(native.ENV, "fortran")
    with pytest.raises(QesError, match="must be 'numba' or 'native'"):
        CodeSpace(space.buf, space.tensors, 0.1)


def test_a_stale_library_is_refused(monkeypatch, tmp_path, fresh_selection):
    monkeypatch.setattr(native, "ABI_VERSION", native.ABI_VERSION + 1)
    if UNAVAILABLE is None:
        assert "stale" in native.unavailable_reason()
    else:
        assert native.unavailable_reason() is not None
