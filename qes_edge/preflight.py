"""Does a run fit on this machine?  Checked by ``train`` before any work, shown by ``inspect``.

A run needs disk for its working copy (on /dev/shm when there is room, else in
the run directory: :func:`placement`), for the residual sidecar (2 bytes per
trainable code and a header, in the run directory) and for the tuned GGUF; and
RAM (MemAvailable) for the working copy (tmpfs is RAM, and llama.cpp maps it
either way), the sidecar (mapped while an update runs, its pages then in the
page cache), llama.cpp's context and the process itself.  The context follows from the model's metadata and the
batch, as :class:`qes_edge.evaluator.Evaluator` asks llama.cpp for it: one
512-token KV stream per prompt (f16 keys and values, exact), and buffers for
512-token batches (the batch's logits dominate; estimated).  The process's own
memory (Python, numpy, Numba, llama.cpp's code) is the figure measured on the
default model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .cpu import mem_available, physical_cores
from .errors import QesError
from .evaluator import BATCH_TOKENS, CONTEXT_PER_PROMPT  # the context a replica's evaluator asks for
from .model_file import ModelFile
from .residual import HEADER_BYTES as SIDECAR_HEADER_BYTES
from .settings import Settings

MiB = 2**20
PROCESS_BYTES = 128 * MiB  # measured: 115 MiB besides the items below, a default run on the dev machine
SHM = Path("/dev/shm")


def mib(n: int) -> str:
    return f"{n / MiB:,.1f} MiB"


@dataclass(frozen=True)
class Estimate:
    """Bytes a run of ``model`` with these settings needs, item by item (on ``replicas`` replicas: each has a
    copy of the model and a llama.cpp context)."""

    replicas: int
    working_copy: int  # every replica's copy
    sidecar: int  # 0 with --residual replay or without error feedback
    gating: int  # one bit per trainable code
    kv_cache: int
    llama_buffers: int  # compute and output buffers
    process: int
    output: int  # the tuned GGUF
    kv_per_prompt: int  # what one prompt less in --batch saves (KV cache and its logits row)

    @property
    def ram(self) -> int:
        return self.working_copy + self.sidecar + self.gating + self.kv_cache + self.llama_buffers + self.process

    def lines(self) -> list[str]:
        copies = f"working copies ({self.replicas} replicas)" if self.replicas > 1 else "working copy"
        ram = [(copies, self.working_copy), ("residual sidecar", self.sidecar),
               ("llama.cpp KV cache", self.kv_cache), ("llama.cpp buffers", self.llama_buffers),
               ("gating bits", self.gating), ("process", self.process)]
        return [f"RAM: about {mib(self.ram)} (" + ", ".join(f"{k} {mib(v)}" for k, v in ram if v) + ")",
                f"disk: {copies} {mib(self.working_copy)} (on /dev/shm when it has room, else in the run "
                "directory)" + (f", residual sidecar {mib(self.sidecar)} (run directory)" if self.sidecar else "")
                + f", tuned GGUF {mib(self.output)}"]


def _int(metadata: dict, key: str, default: int | None = None) -> int | None:
    value = metadata.get(key, default)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else default


def estimate(model: ModelFile, settings: Settings, replicas: int = 1) -> Estimate:
    """What a run of ``model`` with ``settings`` on ``replicas`` replicas needs; see the module docstring for
    what is exact."""
    md = model.metadata
    arch = md.get("general.architecture", "")
    n_layer = _int(md, f"{arch}.block_count", 0)
    n_embd = _int(md, f"{arch}.embedding_length", 0)
    n_head = _int(md, f"{arch}.attention.head_count", 1) or 1
    n_head_kv = _int(md, f"{arch}.attention.head_count_kv", n_head)
    head_k = _int(md, f"{arch}.attention.key_length", n_embd // n_head)
    head_v = _int(md, f"{arch}.attention.value_length", n_embd // n_head)
    n_vocab = _int(md, f"{arch}.vocab_size")
    if n_vocab is None:  # the token embedding is [n_embd, n_vocab] in GGUF order
        n_vocab = next((t.shape[-1] for t in model.tensors if t.name == "token_embd.weight"), 0)
    prompts = max(settings.batch, 1)
    kv_per_prompt = CONTEXT_PER_PROMPT * n_layer * n_head_kv * (head_k + head_v) * 2  # f16 keys and values
    logits_row = 4 * n_vocab  # one float per token of the vocabulary
    codes = model.trainable_codes
    return Estimate(
        replicas=replicas,
        working_copy=replicas * model.file_size,
        sidecar=SIDECAR_HEADER_BYTES + 2 * codes if settings.residual_kind == "sidecar" else 0,
        gating=(codes + 7) // 8,
        kv_cache=replicas * prompts * kv_per_prompt,
        llama_buffers=replicas * (BATCH_TOKENS * (logits_row + 4 * n_head * CONTEXT_PER_PROMPT) + prompts * logits_row),
        process=PROCESS_BYTES,
        output=model.file_size,
        kv_per_prompt=kv_per_prompt + logits_row,
    )


class Machine:
    """What this machine has: cores, free disk space, file systems, available RAM.  Tests pass a fake one."""

    def cores(self) -> int:
        return physical_cores()

    def free_bytes(self, path: Path) -> int:
        stat = os.statvfs(_existing(path))
        return stat.f_bavail * stat.f_frsize

    def device(self, path: Path) -> int:
        return os.stat(_existing(path)).st_dev

    def writable(self, path: Path) -> bool:
        return path.is_dir() and os.access(path, os.W_OK)

    def mem_available(self) -> int | None:
        return mem_available()

    def on_tmpfs(self, path: Path) -> bool:
        """Is ``path`` on /dev/shm (RAM) rather than on a disk?"""
        return SHM.is_dir() and self.device(path) == self.device(SHM)


def replicas(model: ModelFile, settings: Settings, machine: Machine | None = None) -> int:
    """How many replicas score candidates side by side: ``--parallel``, else as many as the physical cores
    hold at ``--threads`` each (default 1), at most one per candidate, while the run on them needs at most
    half of MemAvailable."""
    if settings.parallel:
        return settings.parallel
    machine = machine or Machine()
    count = max(1, min(machine.cores() // (settings.threads or 1), settings.population))
    available = machine.mem_available()
    while count > 1 and available is not None and 2 * estimate(model, settings, count).ram > available:
        count -= 1
    return count


def threads_per_replica(settings: Settings, replicas: int, machine: Machine | None = None) -> int:
    """``--threads``, else the physical cores shared out among the replicas."""
    return settings.threads or max(1, (machine or Machine()).cores() // replicas)


def _existing(path: Path) -> Path:
    """``path``, or its nearest ancestor that exists (a run directory not made yet)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def placement(model_bytes: int, run_dir: Path, machine: Machine | None = None) -> Path:
    """The directory the working copy goes to: /dev/shm when it has twice the model free, else ``run_dir``."""
    machine = machine or Machine()
    if machine.writable(SHM) and machine.free_bytes(SHM) > 2 * model_bytes:
        return SHM
    return Path(run_dir)


def shortfalls(model: ModelFile, settings: Settings, run_dir: Path, out: Path, *, fleet: bool = False,
               replicas: int = 1, live: Path | None = None, machine: Machine | None = None) -> list[str]:
    """What does not fit, one phrase each with the option that helps; [] when the run fits.

    ``fleet``: the workers hold the working copies and the sidecars, so only the tuned GGUF is checked
    here.  ``replicas``: how many copies of the model this process scores on.  ``live``: a resumed run's
    working copy, if it has one.  Files already in place (that copy, a resumed run's sidecar) need no more
    room.
    """
    machine = machine or Machine()
    need = estimate(model, settings, replicas)
    disk = [("tuned GGUF", Path(out), need.output)]
    if not fleet:
        copy = live if live and Path(live).is_file() else placement(model.file_size, run_dir, machine) / "live.gguf"
        disk += [("working copy", Path(copy), need.working_copy),
                 ("residual sidecar", Path(run_dir) / "residual.bin", need.sidecar)]
    by_device: dict[int, list] = {}
    for what, path, size in disk:
        if what != "tuned GGUF" and path.is_file():  # the tuned GGUF is written beside an old one, then replaces it
            size -= path.stat().st_size
        if size > 0:
            by_device.setdefault(machine.device(path), []).append((what, path, size))
    problems = []
    for items in by_device.values():
        where = _existing(items[0][1].parent)
        wanted, free = sum(size for _, _, size in items), machine.free_bytes(where)
        if wanted > free:
            names = {what for what, _, _ in items}
            helps = ([same_result_replay(settings)] if "residual sidecar" in names else []) + \
                    (["another --run-dir"] if names & {"residual sidecar", "working copy"} else []) + \
                    (["a smaller --parallel"] if "working copy" in names and replicas > 1 else []) + \
                    (["another --out"] if "tuned GGUF" in names else [])
            problems.append(f"{where} is {mib(wanted - free)} short ({', '.join(sorted(names))} need "
                            f"{mib(wanted)}, {mib(free)} free; try {' or '.join(helps)})")
    available = None if fleet else machine.mem_available()
    if available is not None and live and Path(live).is_file() and machine.on_tmpfs(Path(live)):
        # a resumed run's copies still on tmpfs (a killed run leaves them there) hold RAM already: MemAvailable
        # does not count them, so neither does what the run still needs
        available += sum(f.stat().st_size for f in Path(live).parent.glob("*.gguf"))
    if available is not None and need.ram > available:
        helps = [f"{same_result_replay(settings)} saves {mib(need.sidecar)}"] if need.sidecar else []
        if replicas > 1:
            per_replica = (need.ram - estimate(model, settings).ram) // (replicas - 1)
            helps.append(f"each replica less in --parallel saves {mib(per_replica)}")
        if settings.batch > 1:
            helps.append(f"each prompt less in --batch saves {mib(replicas * need.kv_per_prompt)}")
        problems.append(f"RAM is {mib(need.ram - available)} short (a run needs about {mib(need.ram)}, "
                        f"MemAvailable is {mib(available)}" + (f"; {', '.join(helps)}" if helps else "") + ")")
    return problems


def same_result_replay(settings: Settings) -> str:
    """The options that keep no sidecar and give the same weights: a replay window that covers the run (each
    update then replays every iteration so far; measured costs in docs/large-models.md)."""
    return f"--residual replay --window {settings.iterations}"


def check(model: ModelFile, settings: Settings, run_dir: Path, out: Path, **options) -> None:
    """QesError, one line, when the run does not fit (see :func:`shortfalls`)."""
    problems = shortfalls(model, settings, run_dir, out, **options)
    if problems:
        raise QesError("this run does not fit here: " + "; ".join(problems))
