"""The working copy: the model that training edits in place, kept as a cache of the run's checkpoint.

The copy (``live.gguf``) is the run's source model with every recorded update
applied.  numpy maps it read-write while llama.cpp maps the same pages
read-only, so an edited code is what the next forward pass multiplies with.
It sits on /dev/shm when there is room (llama.cpp reads it at RAM speed),
else in the run directory, and has its residual store beside it.

A copy is reused only when it is *clean*, i.e. holds exactly the checkpoint;
otherwise it is rebuilt from the source by replaying every recorded update.
Updates are a deterministic function of (seeds, weights), so a run killed at
any point resumes to the bytes an uninterrupted run gives.  Clean means:

- no ``live.dirty``: it is there while candidates are on the copy, from an
  update until the iteration's checkpoint is written, and while a copy is
  rebuilt (:meth:`WorkingCopy.changing`, the one place that marks it);
- no ``live.unsynced``, or one naming this boot.  Updates are not synced to
  disk every iteration: a killed process leaves its writes in the page cache,
  where the next process reads them, and only a power loss can lose them.  So
  an open copy names the boot it is written in, until it is synced at close.
  Where the system has no boot id, every update is synced instead;
- with the sidecar, ``residual.bin`` present (its header says how many
  updates it holds, and whether one was cut off half way).
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .errors import QesError
from .faults import crash_point
from .files import file_sha256, make_working_copy
from .gguf_export import export_model
from .model_file import ModelFile, weights_sha256
from .kernels import CodeSpace, TensorSlot
from .phases import FOLLOW, SYNC, UPDATE, timed
from .preflight import placement
from .residual import NoResidual, ReplayResidual, SidecarResidual
from .run import Run, RunInUse, write_atomically


class WorkingCopy:
    """A run's working copy: placed, checked, rebuilt, mapped, released.

    :meth:`open` maps it at the checkpoint; then ``space`` perturbs and
    restores it, :meth:`update` steps it, :meth:`close` syncs and unmaps it,
    and :meth:`release` deletes it.  Its markers and its sidecar are in
    ``run.run_dir`` (a fleet worker's own directory, for a worker's copy).
    """

    def __init__(self, run: Run):
        self.run = run
        self.files = run.files
        self.model: ModelFile | None = None
        self.buf = self.space = self.store = None
        self.boot: str | None = None

    @property
    def path(self) -> Path | None:
        return self.run.live_path

    def is_clean(self) -> bool:
        """True when the copy (and the sidecar, if any) hold exactly the checkpoint."""
        files = self.files
        clean = self.path is not None and self.path.is_file() and not files.dirty.exists()
        if clean and files.unsynced.exists():
            clean = files.unsynced.read_text() == boot_id()  # else its writes may have died with the machine
        if clean and self.run.settings.residual_kind == "sidecar":
            clean = files.residual.exists()
        return clean

    def open(self, model: ModelFile) -> WorkingCopy:
        """Map the copy at the checkpoint: the clean one, or a new one rebuilt by replay."""
        self.model = model
        if self.is_clean():
            self.buf, self.space, self.store = _mapped(self.run, model, self.path, self.files.residual)
        else:
            self.run.live_path = self._place()
            with self.changing():
                self.run.save()  # where the copy is, so that release finds it even if this process dies
                self.buf, self.space, self.store = replay(self.run, model, self.path, self.files.residual)
        self.boot = boot_id()
        if self.boot:
            write_atomically(self.files.unsynced, self.boot.encode())
        return self

    @contextlib.contextmanager
    def changing(self, restored_on: type[BaseException] | tuple = ()):
        """The span in which the copy may differ from the checkpoint: ``live.dirty`` is there from its start
        to its end.  When the span ends in an exception the marker stays (the next session rebuilds the copy),
        unless the exception is one of ``restored_on``: raised with the copy at the checkpoint again."""
        self.files.dirty.touch()
        try:
            yield
        except restored_on:
            self.files.dirty.unlink()
            raise
        self.files.dirty.unlink()

    def update(self, history: list) -> tuple[int, int]:
        """Apply the last row of ``history``; returns (codes stepped, steps blocked)."""
        with timed(UPDATE):
            result = self.store.update(self.space, history, self.run.settings.decay)
        crash_point("update")
        if self.boot is None:  # no way to tell a reboot: every update goes to disk
            self.sync()
        return result

    def weights_sha256(self) -> str:
        return weights_sha256(self.model, self.buf)

    @timed(SYNC)
    def sync(self) -> None:
        """Put the copy and the residual on disk."""
        self.buf.flush()
        self.store.flush()

    def close(self) -> None:
        """Sync and unmap the copy: it stays clean for a later session."""
        self.sync()
        self.buf = self.space = self.store = None
        self.files.unsynced.unlink(missing_ok=True)

    def release(self) -> None:
        """Delete the copy (RAM, on /dev/shm); a later export or resume rebuilds it.  Hold the run's lock."""
        path = self.path
        self.run.live_path = None
        self.run.save()
        self.files.unsynced.unlink(missing_ok=True)
        if path is not None:
            path.unlink(missing_ok=True)
            for mirror in path.parent.glob(f"{MIRROR_PREFIX}*.gguf"):  # left by a killed run
                mirror.unlink(missing_ok=True)
            if path.parent.name.startswith("qes-edge-"):
                shutil.rmtree(path.parent, ignore_errors=True)

    def _place(self) -> Path:
        scratch = scratch_dir(self.run)
        if scratch == self.run.run_dir:
            return self.files.live
        tag = hashlib.sha256(str(self.run.run_dir.resolve()).encode()).hexdigest()[:12]
        return scratch / f"qes-edge-{tag}" / "live.gguf"


MIRROR_PREFIX = "mirror-"


class Mirror:
    """A byte copy of a working copy, for one more replica to score candidates on.

    Beside the working copy (``mirror-N.gguf``), made at :meth:`open` from
    it, and deleted at :meth:`close`.  It is never updated itself: after each
    update, :meth:`follow` copies the working copy's bytes again.  So it needs
    no residual and no markers: a run killed with mirrors open leaves files
    that the next open overwrites and that :meth:`WorkingCopy.release` deletes.
    """

    def __init__(self, copy: WorkingCopy, index: int):
        self.copy, self.run, self.index = copy, copy.run, index
        self.path: Path | None = None
        self.buf = self.space = None

    def open(self, model: ModelFile) -> Mirror:
        self.path = self.copy.path.with_name(f"{MIRROR_PREFIX}{self.index}.gguf")
        shutil.copyfile(self.copy.path, self.path)  # through the page cache: the copy's unsynced writes too
        self.buf, self.space = _code_space(self.run, model, self.path)
        return self

    @timed(FOLLOW)
    def follow(self) -> None:
        """Take the working copy's bytes (after an update)."""
        np.copyto(self.buf, self.copy.buf)

    def close(self) -> None:
        self.buf = self.space = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def release(run: Run) -> None:
    """Delete the run's working copy, if it has one; RunInUse while another process trains the run."""
    with run.lock():
        WorkingCopy(run).release()


def export(run: Run, out: Path) -> Path:
    """Write the checkpoint's model to ``out`` with the run's ``qes.*`` provenance.

    From the working copy when it holds the checkpoint; otherwise (a run being
    trained right now, a crashed one, one whose copy was released) from a copy
    rebuilt in a temporary directory and removed after, so the trainer's
    (perhaps perturbed) copy is never read or touched.
    """
    model = run.open_model()
    copy = WorkingCopy(run)
    try:
        with run.lock():
            if copy.is_clean():
                export_model(copy.path, out, run.provenance(), protect=[run.source])
                return Path(out)
    except RunInUse:
        pass
    with tempfile.TemporaryDirectory(prefix="qes-edge-export-", dir=scratch_dir(run)) as tmp:
        live = Path(tmp) / "live.gguf"
        buf, _, _ = replay(run, model, live, Path(tmp) / "residual.bin")
        del buf
        export_model(live, out, run.provenance(), protect=[run.source])
    return Path(out)


def replay(run: Run, model: ModelFile, live: Path, residual: Path) -> tuple:
    """Copy the source to ``live``, map it and replay every recorded update onto it: (buf, space, store)."""
    if file_sha256(run.source) != run.base_sha256:
        raise QesError(f"the source model {run.source} changed since the run started; "
                       "its checkpoint cannot be rebuilt")
    make_working_copy(run.source, live)
    residual.unlink(missing_ok=True)
    buf, space, store = _mapped(run, model, live, residual)
    for t in range(len(run.history)):
        store.update(space, run.history[:t + 1], run.settings.decay)
    buf.flush()
    return buf, space, store


def _mapped(run: Run, model: ModelFile, live: Path, residual: Path) -> tuple:
    """The copy at ``live`` mapped read-write, its code space, and the run's residual store."""
    buf, space = _code_space(run, model, live)
    stores = {
        "none": lambda: NoResidual(),
        "replay": lambda: ReplayResidual(run.settings.window),
        "sidecar": lambda: SidecarResidual(residual, model.header_sha256, space.n_codes),
    }
    return buf, space, stores[run.settings.residual_kind]()


def _code_space(run: Run, model: ModelFile, path: Path) -> tuple:
    """The model file at ``path`` mapped read-write, and its code space."""
    buf = np.memmap(path, dtype=np.uint8, mode="r+")
    slots = [TensorSlot(t.name, t.ggml_type, t.offset, t.n_elements) for t in model.trainable]
    return buf, CodeSpace(buf, slots, run.settings.sigma)


def scratch_dir(run: Run) -> Path:
    """Where working copies go: tmpfs when there is room (llama.cpp reads it at RAM speed), else the run dir."""
    return placement(run.source.stat().st_size, run.run_dir)


def boot_id() -> str | None:
    """This boot's id (changes at every reboot), or None where the system does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None
