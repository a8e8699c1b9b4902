"""Code layouts against the gguf oracle: a code step moves exactly one weight by exactly one step."""

import numpy as np
import pytest

from blocks import ALL, dequantize, random_blocks, step_size
from qes_edge.formats import FORMATS

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_one_code_step_moves_one_weight_by_one_step(qtype):
    fmt = FORMATS[qtype]
    rng = np.random.default_rng(int(qtype))
    raw = random_blocks(qtype, 6, rng)
    codes = fmt.read_codes(raw)
    assert codes.min() >= fmt.code_lo and codes.max() <= fmt.code_hi
    before = dequantize(qtype, raw)
    for i in rng.choice(codes.size, size=40, replace=False):
        direction = 1 if codes[i] < fmt.code_hi else -1
        moved = raw.copy()
        new_codes = codes.copy()
        new_codes[i] += direction
        fmt.write_codes(moved, new_codes)
        after = dequantize(qtype, moved)
        changed = np.flatnonzero(after != before)
        block, j = divmod(i, fmt.block_elems)
        expected = step_size(qtype, raw[block * fmt.block_bytes:(block + 1) * fmt.block_bytes], j)
        assert list(changed) == ([i] if expected != 0 else [])
        assert after[i] - before[i] == pytest.approx(direction * expected, rel=1e-3, abs=1e-7)
        # scales and every other code are untouched
        assert np.array_equal(np.delete(fmt.read_codes(moved), i), np.delete(codes, i))


@pytest.mark.parametrize("qtype", ALL, ids=lambda q: q.name)
def test_write_read_round_trip_over_the_whole_range(qtype):
    fmt = FORMATS[qtype]
    rng = np.random.default_rng(7)
    raw = random_blocks(qtype, 3, rng)
    scales_before = raw.copy()
    codes = rng.integers(fmt.code_lo, fmt.code_hi + 1, size=3 * fmt.block_elems)
    codes[:2] = fmt.code_lo, fmt.code_hi
    fmt.write_codes(raw, codes)
    assert np.array_equal(fmt.read_codes(raw), codes)
    # only code bits changed: writing the old codes back gives the old bytes
    fmt.write_codes(raw, fmt.read_codes(scales_before))
    assert np.array_equal(raw, scales_before)


def test_code_ranges_follow_the_bit_widths():
    ranges = {f.name: (f.code_lo, f.code_hi) for f in FORMATS.values()}
    assert ranges == {
        "Q8_0": (-128, 127), "Q4_0": (0, 15), "Q4_1": (0, 15), "Q5_0": (0, 31), "Q5_1": (0, 31),
        "Q4_K": (0, 15), "Q5_K": (0, 31), "Q6_K": (0, 63),
    }


def test_write_refuses_out_of_range_codes():
    fmt = next(f for f in FORMATS.values() if f.name == "Q4_0")
    raw = random_blocks(fmt.ggml_type, 1, np.random.default_rng(0))
    with pytest.raises(ValueError):
        fmt.write_codes(raw, np.full(32, 16))
