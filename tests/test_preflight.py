"""Does a run fit?  The estimate, and the one-line refusal, against a fake machine."""

from pathlib import Path

import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as QT

from qes_edge import preflight
from qes_edge.cli import cli
from qes_edge.errors import QesError
from qes_edge.model_file import ModelFile, TensorInfo
from qes_edge.preflight import MiB, Machine, estimate, mib, placement, shortfalls
from qes_edge.settings import Settings

pytestmark = pytest.mark.unit

# SmolLM2-135M-Instruct's shape: 30 layers, 9 heads of 64, 3 KV heads, 49152 tokens.
SMOLLM2 = {"general.architecture": "llama", "llama.block_count": 30, "llama.embedding_length": 576,
           "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3, "llama.vocab_size": 49152}
CODES = 106_168_320
FILE = 98_362_432


def model(metadata=SMOLLM2, codes=CODES, file_size=FILE) -> ModelFile:
    matrix = TensorInfo("blk.0.ffn_up.weight", int(QT.Q4_1), "Q4_1", (codes // 64, 64), codes, 0, 0, True, "")
    return ModelFile(Path("m.gguf"), 3, 32, 0, file_size, [matrix], dict(metadata), "0" * 64)


class FakeMachine(Machine):
    """/dev/shm (device 1), a disk for the paths under ``other_dir`` (device 3), one for the rest (device 2)."""

    def __init__(self, ram=8 << 30, shm=8 << 30, disk=8 << 30, other=None, other_dir=None, cores=2):
        self.ram, self.free, self.other_dir = ram, {1: shm, 2: disk, 3: other}, str(other_dir)
        self.n_cores = cores

    def cores(self):
        return self.n_cores

    def device(self, path):
        path = str(path)
        return 1 if path.startswith("/dev/shm") else 3 if path.startswith(self.other_dir) else 2

    def free_bytes(self, path):
        return self.free[self.device(path)]

    def writable(self, path):
        return True

    def mem_available(self):
        return self.ram


def need(settings=None):
    return estimate(model(), settings or Settings())


def test_the_kv_cache_is_what_llama_cpp_allocates():
    # llama.cpp reports "CPU KV buffer size = 180.00 MiB" for SmolLM2 with 16 sequences of 512 tokens
    assert need().kv_cache == 180 * MiB
    assert need(Settings(batch=8)).kv_cache == 90 * MiB


def test_the_sidecar_is_two_bytes_a_code_plus_its_header_and_replay_has_none():
    assert need().sidecar == 2 * CODES + 128
    assert need(Settings(residual="replay")).sidecar == 0
    assert need(Settings(error_feedback=False)).sidecar == 0
    assert need().ram - need(Settings(residual="replay")).ram == 2 * CODES + 128


def test_the_estimate_covers_what_a_default_run_used():
    # A default run of SmolLM2 peaked at 693 MiB resident on the dev machine (docs/raspberry-pi.md, "Memory").
    assert 693 * MiB <= need().ram <= 800 * MiB


def test_metadata_without_a_vocabulary_size_uses_the_token_embedding():
    metadata = {k: v for k, v in SMOLLM2.items() if k != "llama.vocab_size"}
    m = model(metadata)
    m.tensors.append(TensorInfo("token_embd.weight", int(QT.Q8_0), "Q8_0", (576, 49152), 576 * 49152, 0, 0,
                                False, "embedding"))
    assert estimate(m, Settings()) == need()


def test_a_run_that_fits_has_no_shortfalls(tmp_path):
    assert shortfalls(model(), Settings(), tmp_path / "run", tmp_path / "run" / "out.gguf",
                      machine=FakeMachine()) == []


def test_too_little_ram_names_the_shortfall_and_what_helps(tmp_path):
    ram = need().ram - 100 * MiB
    [problem] = shortfalls(model(), Settings(), tmp_path / "run", tmp_path / "out.gguf",
                           machine=FakeMachine(ram=ram))
    assert problem.startswith("RAM is 100.0 MiB short")
    assert f"--residual replay --window 25 saves {2 * CODES / MiB:,.1f} MiB" in problem  # the same bytes
    assert "--batch" in problem
    assert shortfalls(model(), Settings(residual="replay"), tmp_path / "run", tmp_path / "out.gguf",
                      machine=FakeMachine(ram=ram)) == []


def test_replicas_fill_the_cores_up_to_the_population_while_they_fit_in_half_the_ram():
    replicas = preflight.replicas
    assert replicas(model(), Settings(), FakeMachine(cores=4)) == 4
    assert replicas(model(), Settings(population=2), FakeMachine(cores=4)) == 2
    assert replicas(model(), Settings(threads=2), FakeMachine(cores=4)) == 2  # --threads is per replica
    assert replicas(model(), Settings(threads=8), FakeMachine(cores=4)) == 1
    three = estimate(model(), Settings(), 3).ram
    assert replicas(model(), Settings(), FakeMachine(cores=4, ram=2 * three)) == 3
    assert replicas(model(), Settings(), FakeMachine(cores=4, ram=need().ram)) == 1  # one always: it must fit
    assert replicas(model(), Settings(parallel=5), FakeMachine(cores=1, ram=0)) == 5  # asked for: then checked
    assert preflight.threads_per_replica(Settings(), 2, FakeMachine(cores=4)) == 2
    assert preflight.threads_per_replica(Settings(), 3, FakeMachine(cores=2)) == 1
    assert preflight.threads_per_replica(Settings(threads=3), 2, FakeMachine(cores=2)) == 3


def test_each_replica_has_a_copy_and_a_context_and_too_many_are_refused_with_what_helps(tmp_path):
    one, two = need(), estimate(model(), Settings(), 2)
    assert two.working_copy == 2 * FILE and two.kv_cache == 2 * one.kv_cache
    assert two.sidecar == one.sidecar and two.gating == one.gating  # one residual, whatever the replicas
    assert "working copies (2 replicas)" in two.lines()[0]
    [problem] = shortfalls(model(), Settings(), tmp_path / "run", tmp_path / "out.gguf", replicas=2,
                           machine=FakeMachine(ram=one.ram + MiB))
    assert problem.startswith("RAM is") and f"each replica less in --parallel saves {mib(two.ram - one.ram)}" in problem
    assert shortfalls(model(), Settings(), tmp_path / "run", tmp_path / "out.gguf", replicas=1,
                      machine=FakeMachine(ram=one.ram + MiB)) == []


def test_a_full_shm_puts_the_copy_in_the_run_directory_whose_disk_must_hold_it(tmp_path):
    small_shm = FakeMachine(shm=FILE)  # less than twice the model
    assert placement(FILE, tmp_path, small_shm) == tmp_path
    assert placement(FILE, tmp_path, FakeMachine()) == Path("/dev/shm")
    n = need()
    wanted = n.working_copy + n.sidecar + n.output  # all three on the run directory's disk
    machine = FakeMachine(shm=FILE, disk=wanted - 5 * MiB)
    [problem] = shortfalls(model(), Settings(), tmp_path / "run", tmp_path / "run" / "out.gguf", machine=machine)
    assert problem.startswith(f"{tmp_path} is 5.0 MiB short (residual sidecar, tuned GGUF, working copy need")
    assert "try --residual replay --window 25 or another --run-dir or another --out" in problem
    with_room_in_shm = FakeMachine(disk=wanted - 5 * MiB)  # the copy goes to /dev/shm instead
    assert shortfalls(model(), Settings(), tmp_path / "run", tmp_path / "run" / "out.gguf",
                      machine=with_room_in_shm) == []


def test_an_output_on_a_full_disk_suggests_another_out(tmp_path):
    other = tmp_path / "usb"
    other.mkdir()
    [problem] = shortfalls(model(), Settings(), tmp_path / "run", other / "out.gguf",
                           machine=FakeMachine(other=MiB, other_dir=other))
    assert problem == (f"{other} is {(FILE - MiB) / MiB:,.1f} MiB short (tuned GGUF need {FILE / MiB:,.1f} MiB, "
                       "1.0 MiB free; try another --out)")


def test_a_fleet_driver_checks_only_its_output(tmp_path):
    machine = FakeMachine(ram=MiB, shm=0, disk=FILE + MiB)
    assert shortfalls(model(), Settings(), tmp_path / "run", tmp_path / "out.gguf", fleet=True,
                      machine=machine) == []


def test_a_resumed_runs_sidecar_and_copy_need_no_more_room(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    n = need()
    machine = FakeMachine(shm=FILE, disk=n.output + MiB)  # room for the output alone
    assert shortfalls(model(), Settings(), run_dir, run_dir / "out.gguf", machine=machine)
    with open(run_dir / "residual.bin", "wb") as f:
        f.truncate(n.sidecar)
    with open(run_dir / "live.gguf", "wb") as f:
        f.truncate(n.working_copy)
    assert shortfalls(model(), Settings(), run_dir, run_dir / "out.gguf", live=run_dir / "live.gguf",
                      machine=machine) == []


def test_a_resumed_runs_copies_on_tmpfs_are_ram_it_already_holds(tmp_path):
    """A killed run leaves its working copy and mirrors on /dev/shm: MemAvailable no longer counts them, and
    the resume needs no more RAM for them (a 7B run was refused here for counting its copy twice)."""
    run_dir, copies = tmp_path / "run", tmp_path / "qes-edge-0123"
    copies.mkdir()
    for name in ("live.gguf", "mirror-1.gguf"):
        with open(copies / name, "wb") as f:
            f.truncate(FILE)

    class Tmpfs(FakeMachine):
        def on_tmpfs(self, path):
            return True

    two = estimate(model(), Settings(), 2)
    left = two.ram - 2 * FILE + MiB  # MemAvailable once the two copies are on /dev/shm
    resumed = dict(replicas=2, live=copies / "live.gguf")
    assert shortfalls(model(), Settings(), run_dir, tmp_path / "out.gguf", machine=Tmpfs(ram=left), **resumed) == []
    [short] = shortfalls(model(), Settings(), run_dir, tmp_path / "out.gguf", machine=Tmpfs(ram=left), replicas=2)
    assert short.startswith("RAM is")  # a new run makes its copies: it needs their RAM
    [short] = shortfalls(model(), Settings(), run_dir, tmp_path / "out.gguf", machine=FakeMachine(ram=left),
                         **resumed)
    assert short.startswith("RAM is")  # a copy on a disk holds no RAM


def test_check_refuses_in_one_line(tmp_path):
    machine = FakeMachine(ram=MiB, shm=FILE, disk=MiB)
    with pytest.raises(QesError) as refused:
        preflight.check(model(), Settings(), tmp_path / "run", tmp_path / "out.gguf", machine=machine)
    message = str(refused.value)
    assert message.startswith("this run does not fit here: ") and "\n" not in message
    assert "RAM is" in message and f"{tmp_path} is" in message


def test_train_refuses_before_any_work_with_one_line(synthetic_gguf, tmp_path, monkeypatch):
    import numpy as np

    path = synthetic_gguf("small.gguf", {"blk.0.ffn_up.weight": (np.ones((64, 64), np.float32), QT.Q8_0)})
    monkeypatch.setattr(Machine, "mem_available", lambda self: 1 * MiB)
    result = CliRunner().invoke(cli, ["train", str(path), "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert line.startswith("Error: this run does not fit here: RAM is ") and "MemAvailable is 1.0 MiB" in line
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
