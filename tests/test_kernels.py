"""The QES kernels on real quant blocks: perturb/restore, sampling, and the update vs a dense reference."""

import resource
import signal

import numpy as np
import pytest

from blocks import ALL, make_space
from qes_edge.errors import QesError
from qes_edge.formats import FORMATS
from qes_edge.kernels import NoiseTable, sample_tensor, support_seed, tensor_key
from qes_edge.residual import NoResidual, ReplayResidual, SidecarResidual

pytestmark = pytest.mark.unit


def codes_of(space):
    out = []
    for slot in space.tensors:
        fmt = FORMATS[slot.ggml_type]
        n_bytes = slot.n_elements // fmt.block_elems * fmt.block_bytes
        out.append(fmt.read_codes(space.buf[slot.offset:slot.offset + n_bytes]))
    return out


SUPPORT = 1234567  # the support seed of the tests that perturb one seed at a time


def deltas_of(space, seed, support=SUPPORT):
    """Dense delta per tensor from the reference sampler."""
    out = []
    for slot in space.tensors:
        positions, deltas = sample_tensor(seed, support, tensor_key(slot.name), slot.n_elements, space.noise)
        dense = np.zeros(slot.n_elements, dtype=np.int64)
        dense[positions] = deltas
        out.append(dense)
    return out


@pytest.mark.parametrize("sigma", [0.01, 0.4, 1.5])
def test_perturb_restore_is_byte_identical_for_every_format(sigma):
    space = make_space(ALL, sigma)
    original = space.buf.copy()
    for seed in [1, 2, -2, 12345]:
        before = codes_of(space)
        changed = space.perturb(seed, SUPPORT)
        assert changed > 0 and not np.array_equal(space.buf, original)
        for slot, codes, after, delta in zip(space.tensors, before, codes_of(space), deltas_of(space, seed)):
            fmt = FORMATS[slot.ggml_type]
            moved = codes + delta
            inside = (moved >= fmt.code_lo) & (moved <= fmt.code_hi)
            assert np.array_equal(after, np.where(inside, moved, codes))  # gated where it would leave
            assert after.min() >= fmt.code_lo and after.max() <= fmt.code_hi
        assert space.restore(seed, SUPPORT) == changed
        assert np.array_equal(space.buf, original)
        assert not space.gated.any()


def test_perturbation_only_touches_code_bits():
    space = make_space(ALL, 0.5)
    original = space.buf.copy()
    space.perturb(99, SUPPORT)
    for slot, codes in zip(space.tensors, codes_of(space)):
        fmt = FORMATS[slot.ggml_type]
        n_bytes = slot.n_elements // fmt.block_elems * fmt.block_bytes
        expect = original[slot.offset:slot.offset + n_bytes].copy()
        fmt.write_codes(expect, codes)  # the original bytes with only the codes replaced
        assert np.array_equal(space.buf[slot.offset:slot.offset + n_bytes], expect)
    assert np.array_equal(space.buf[:16], original[:16])


def test_same_seed_same_bytes_and_pairs_share_the_support():
    a, b = make_space(ALL, 0.05), make_space(ALL, 0.05)
    a.perturb(7, SUPPORT)
    b.perturb(7, SUPPORT)
    assert np.array_equal(a.buf, b.buf)
    n = a.noise
    key = tensor_key("blk.0.Q8_0")
    p7, d7 = sample_tensor(7, SUPPORT, key, 100_000, n)
    p8, d8 = sample_tensor(8, SUPPORT, key, 100_000, n)
    # The pairs of an iteration perturb the same codes, each with signs of its own.
    assert np.array_equal(p7, p8) and np.array_equal(np.abs(d7), np.abs(d8))
    agree = np.mean(np.sign(d7) == np.sign(d8))
    assert abs(agree - 0.5) < 5 * 0.5 / np.sqrt(len(d7))
    # Another iteration's support, or another tensor, is another set of codes.
    other_support, _ = sample_tensor(7, SUPPORT + 1, key, 100_000, n)
    other_tensor, _ = sample_tensor(7, SUPPORT, tensor_key("blk.1.Q4_0"), 100_000, n)
    for other in (other_support, other_tensor):
        assert len(np.intersect1d(p7, other)) < 0.1 * len(p7)


def test_a_perturb_on_one_thread_gives_the_full_teams_bytes():
    team, one = make_space(ALL, 0.05), make_space(ALL, 0.05)
    one.threads = 1  # what a replica decoding on one thread beside others sets
    assert team.perturb(7, SUPPORT) == one.perturb(7, SUPPORT) > 0
    assert np.array_equal(team.buf, one.buf)
    assert one.restore(7, SUPPORT) == team.restore(7, SUPPORT)
    assert np.array_equal(team.buf, one.buf) and not one.gated.any()


def test_support_seed_is_a_pure_function_of_the_pair_seeds():
    seeds = np.array([3, 5, 7], dtype=np.int64)
    assert support_seed(seeds) == support_seed(seeds.copy()) > 0
    assert support_seed(seeds) != support_seed(np.array([3, 5, 8], dtype=np.int64))


def test_mirrored_seed_gives_the_negated_perturbation():
    n = NoiseTable.for_sigma(0.3)
    key = tensor_key("blk.3.ffn_up.weight")
    pos, delta = sample_tensor(31, SUPPORT, key, 50_000, n)
    pos_m, delta_m = sample_tensor(-31, SUPPORT, key, 50_000, n)
    assert np.array_equal(pos, pos_m) and np.array_equal(delta, -delta_m)


@pytest.mark.parametrize("sigma", [0.001, 0.01, 0.1, 0.8])
def test_sampled_deltas_follow_stochastic_rounding_of_a_normal(sigma):
    """Counts of each delta value match stochastic_round(sigma * eps) drawn densely, within 5 SE."""
    n = NoiseTable.for_sigma(sigma)
    size = 4_000_000
    _, deltas = sample_tensor(5, SUPPORT, tensor_key("t"), size, n)
    rng = np.random.default_rng(0)
    x = sigma * rng.standard_normal(size)
    dense = np.floor(x) + (rng.random(size) < x - np.floor(x))
    for value in range(-3, 4):
        if value == 0:
            continue
        got, want = np.sum(deltas == value), np.sum(dense == value)
        tolerance = 5 * np.sqrt(want + got + 1) + 1
        assert abs(got - want) <= tolerance, (value, got, want)
    assert abs(n.density - np.mean(dense != 0)) < 5 * np.sqrt(n.density / size) + 1e-6


def test_noise_tables_are_integer_and_reproducible():
    a, b = NoiseTable.for_sigma(0.01), NoiseTable.for_sigma(0.01)
    assert a.gap_tail.dtype == np.uint64 and np.array_equal(a.gap_tail, b.gap_tail)
    assert np.array_equal(a.guide, b.guide) and np.array_equal(a.magnitude_tail, b.magnitude_tail)
    assert a.density == pytest.approx(0.01 * np.sqrt(2 / np.pi), rel=1e-9)


# ---- the update against a plain dense numpy reference ------------------------------------------

ONE, HALF = 1 << 15, 1 << 14


def reference_update(codes, ranges, history, deltas, gamma_fx, feedback, window):
    """Dense numpy version of the update: rebuild e over the window, then step the codes."""
    codes = [c.copy() for c in codes]
    t = len(history) - 1
    rows = range(max(0, t - window), t + 1) if feedback else [t]
    errors = [np.zeros_like(c) for c in codes]
    for h in rows:
        seeds, weights = history[h]
        for k, (c, e, (lo, hi)) in enumerate(zip(codes, errors, ranges)):
            g = sum(w * deltas[h, s][k] for s, w in zip(seeds, weights))
            u = g + ((gamma_fx * e + HALF) >> 15) if feedback else g
            step = (u + HALF) >> 15
            e[:] = u - step * ONE if feedback else 0
            if h == t:
                moved = c + step
                ok = (moved >= lo) & (moved <= hi)
                c[ok] = moved[ok]
    return codes, errors


def random_history(rng, iterations, pairs):
    return [(rng.integers(1, 2**62, size=pairs, dtype=np.int64), rng.integers(-30000, 30000, size=pairs))
            for _ in range(iterations)]


@pytest.mark.parametrize("gamma", [0.9, 1.0])
@pytest.mark.parametrize("store", ["sidecar", "replay", "replay-window-2", "none"])
def test_update_equals_dense_reference(store, gamma, tmp_path):
    space = make_space(ALL, 0.2, seed=3)
    ranges = [(FORMATS[s.ggml_type].code_lo, FORMATS[s.ggml_type].code_hi) for s in space.tensors]
    rng = np.random.default_rng(11)
    history = random_history(rng, 6, 4)
    deltas = {(h, s): deltas_of(space, s, support_seed(seeds)) for h, (seeds, _) in enumerate(history) for s in seeds}
    window = {"sidecar": 10**9, "replay": 50, "replay-window-2": 2, "none": 0}[store]
    residual = {
        "sidecar": lambda: SidecarResidual(tmp_path / "residual.bin", "ab" * 32, space.n_codes),
        "replay": lambda: ReplayResidual(50),
        "replay-window-2": lambda: ReplayResidual(2),
        "none": NoResidual,
    }[store]()
    for t in range(len(history)):
        expected, errors = reference_update(codes_of(space), ranges, history[:t + 1], deltas,
                                            {0.9: 29491, 1.0: ONE}[gamma], store != "none", window)
        residual.update(space, history[:t + 1], gamma=gamma)
        for got, want in zip(codes_of(space), expected):
            assert np.array_equal(got, want)
        if store == "sidecar":
            assert np.array_equal(residual.mapped(), np.concatenate(errors))


def test_replay_and_sidecar_agree_when_the_window_covers_the_run(tmp_path):
    a, b = make_space(ALL, 0.1, seed=5), make_space(ALL, 0.1, seed=5)
    sidecar = SidecarResidual(tmp_path / "r.bin", "cd" * 32, a.n_codes)
    replay = ReplayResidual(window=8)
    history = random_history(np.random.default_rng(2), 8, 6)
    stepped = 0
    for t in range(len(history)):
        stepped += sidecar.update(a, history[:t + 1], 0.9)[0]
        replay.update(b, history[:t + 1], 0.9)
        assert np.array_equal(a.buf, b.buf)
    assert stepped > 0


def test_error_feedback_moves_codes_that_plain_rounding_cannot(tmp_path):
    """A steady push of 0.3 steps: plain rounding never moves a code, the residual moves it 3 times in 10."""
    q8 = [FORMATS_BY_NAME["Q8_0"]]
    base = make_space(q8, 0.05, edge_fraction=0.0)
    space, plain = make_space(q8, 0.05, edge_fraction=0.0), make_space(q8, 0.05, edge_fraction=0.0)
    history = [(np.array([77], dtype=np.int64), np.array([int(0.3 * ONE)]))] * 10
    sidecar = SidecarResidual(tmp_path / "r.bin", "00" * 32, space.n_codes)
    for t in range(len(history)):
        sidecar.update(space, history[:t + 1], gamma=1.0)
        NoResidual().update(plain, history[:t + 1], gamma=1.0)
    assert np.array_equal(plain.buf, base.buf)
    start = codes_of(base)[0]
    drift = codes_of(space)[0] - start
    delta = deltas_of(space, 77, support_seed(history[0][0]))[0]
    free = (start > -125) & (start < 125)  # away from the edges, where steps are blocked
    assert np.all(drift[free & (delta == 1)] == 3) and np.all(drift[free & (delta == -1)] == -3)
    assert np.all(drift[delta == 0] == 0) and (free & (delta != 0)).sum() > 100


def test_sidecar_refuses_another_model_and_a_truncated_file(tmp_path):
    path = tmp_path / "r.bin"
    SidecarResidual(path, "11" * 32, 1024)
    with pytest.raises(QesError, match="different base model"):
        SidecarResidual(path, "22" * 32, 1024)
    with pytest.raises(QesError, match="different base model"):
        SidecarResidual(path, "11" * 32, 2048)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(QesError, match="truncated"):
        SidecarResidual(path, "11" * 32, 1024)


def test_a_sidecar_that_cannot_be_made_is_one_error_and_no_file(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit: EFBIG, as a full disk's ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))
    try:
        with pytest.raises(QesError) as error:
            SidecarResidual(tmp_path / "r.bin", "11" * 32, 1 << 20)  # 2 MiB
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    message = str(error.value)
    assert "\n" not in message and "r.bin" in message and "cannot make the 2 MiB residual sidecar" in message
    assert list(tmp_path.iterdir()) == []


FORMATS_BY_NAME = {f.name: f.ggml_type for f in FORMATS.values()}
