"""Damaged GGUF files: thousands of seeded mutations of a real header, only clean one-line errors.

A small llama-architecture GGUF (metadata of every value type, a tensor table of
quantized and float tensors) is mutated 2,400 ways — bytes flipped, length
fields blown up, bytes inserted or deleted inside the header, the file cut at
random offsets — and each result is opened.  Every outcome must be a model or a
QesError: no other exception, and no hang (an alarm fails any open that takes
seconds).  A sample goes through `qes-edge inspect` to check the user sees one
`Error:` line and exit status 1.
"""

import random
import signal

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFWriter

from qes_edge.cli import cli
from qes_edge.errors import QesError
from qes_edge.model_file import open_model

pytestmark = pytest.mark.unit

MUTANTS = 2400
CLI_SAMPLE = 40


@pytest.fixture(scope="module")
def seed_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "seed.gguf"
    rng = np.random.default_rng(0)
    writer = GGUFWriter(path, arch="llama")
    writer.add_name("fuzz seed")
    writer.add_uint32("llama.block_count", 1)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_bool("fuzz.flag", True)
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "</s>", "hello", "world"])
    writer.add_array("fuzz.numbers", [1, 2, 3, 4])
    writer.add_tensor("blk.0.attn_q.weight", rng.standard_normal((64, 64), dtype=np.float32))
    quantized = np.frombuffer(rng.integers(0, 255, 64 * 34, dtype=np.uint8).tobytes(), dtype=np.uint8)
    writer.add_tensor("blk.0.ffn_up.weight", quantized.reshape(64, 34), raw_dtype=GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    header_end = open_model(path).tensors[0].offset  # the data section starts at the first tensor
    return data, header_end


def mutate(data: bytes, header_end: int, rng: random.Random) -> bytes:
    raw = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # flip a few bytes of the header
        for _ in range(rng.randint(1, 8)):
            raw[rng.randrange(header_end)] ^= 1 << rng.randrange(8)
    elif kind == 1:  # a length, count, type or offset field becomes huge or negative
        at = rng.randrange(max(1, header_end - 8))
        raw[at:at + 8] = rng.choice([b"\xff" * 8, b"\x00\x00\x00\x80" * 2, b"\xfe\xff\xff\x7f\x00\x00\x00\x00"])
    elif kind == 2:  # bytes inserted into the header
        at = rng.randrange(header_end)
        raw[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == 3:  # bytes deleted from the header
        at = rng.randrange(header_end)
        del raw[at:at + rng.randint(1, 16)]
    else:  # truncated anywhere
        del raw[rng.randrange(len(raw)):]
    return bytes(raw)


def _timeout(signum, frame):
    raise TimeoutError("opening a damaged file took too long")


def test_damaged_files_give_clean_errors(seed_file, tmp_path):
    data, header_end = seed_file
    rng = random.Random(20261123)
    path = tmp_path / "mutant.gguf"
    outcomes = {"opened": 0, "refused": 0}
    previous = signal.signal(signal.SIGALRM, _timeout)
    try:
        for i in range(MUTANTS):
            mutant = mutate(data, header_end, rng)
            path.write_bytes(mutant)
            signal.alarm(5)
            try:
                open_model(path)
                outcomes["opened"] += 1
            except QesError as e:
                message = str(e)
                assert message and "\n" not in message, f"mutant {i}: {message!r}"
                outcomes["refused"] += 1
            except Exception as e:  # noqa: BLE001 — anything else is the bug this test looks for
                pytest.fail(f"mutant {i} raised {type(e).__name__}: {e}")
            finally:
                signal.alarm(0)
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["refused"] > MUTANTS // 2, outcomes  # the mutations do damage; most must be caught


def test_the_cli_reports_damage_in_one_line(seed_file, tmp_path):
    data, header_end = seed_file
    rng = random.Random(7)
    runner = CliRunner()
    refused = 0
    for i in range(CLI_SAMPLE):
        path = tmp_path / f"mutant{i}.gguf"
        path.write_bytes(mutate(data, header_end, rng))
        result = runner.invoke(cli, ["inspect", str(path)])
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.output
        if result.exit_code:
            refused += 1
            assert result.exit_code == 1
            lines = [line for line in result.output.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert refused > 0
