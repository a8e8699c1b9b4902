"""Where the error-feedback residual lives between iterations, behind one interface.

- :class:`SidecarResidual`: one int16 per trainable code (2**-15 code steps)
  in a memory-mapped file in the run directory, with a header that ties it to
  its base model and says how many updates it holds.
- :class:`ReplayResidual`: stateless; the residual is rebuilt from zero by
  replaying the last ``window`` iterations' (seeds, weights).  Because the
  residual never depends on the codes (see :mod:`qes_edge.kernels.update`),
  a window that covers the whole run gives exactly the sidecar's residual.
- :class:`NoResidual`: the paper's control, plain round(alpha * g).

Each store's ``update(space, history, gamma)`` takes the whole history of
(seeds, weights) rows, oldest first, the last row being this iteration.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from pathlib import Path

import numpy as np

from .cpu import mem_available
from .errors import QesError
from .faults import crash_point
from .kernels import FRACTION_BITS, CodeSpace

SIDECAR_MAGIC = b"QESRESID"
SIDECAR_VERSION = 1
_HEADER = struct.Struct("<8sIIQqI32s")  # magic, version, fraction bits, codes, updates held, busy, model header
HEADER_BYTES = 128
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14 (Python's mmap module does not name it)


class NoResidual:
    """No error feedback: each step is round(alpha * g) and the remainder is lost."""

    def update(self, space: CodeSpace, history: list, gamma: float) -> tuple[int, int]:
        seeds, weights = history[-1]
        return space.update(seeds[None], weights[None], gamma, feedback=False, residual=None)

    def flush(self) -> None:
        pass


class ReplayResidual:
    """Rebuild the residual from the last ``window`` iterations' seeds and weights."""

    def __init__(self, window: int = 50):
        self.window = window

    def update(self, space: CodeSpace, history: list, gamma: float) -> tuple[int, int]:
        rows = history[-(self.window + 1):]
        seeds = np.stack([s for s, _ in rows])
        weights = np.stack([w for _, w in rows])
        return space.update(seeds, weights, gamma, feedback=True, residual=None)

    def flush(self) -> None:
        pass


class SidecarResidual:
    """The residual as an int16 file beside the run, memory-mapped only while an update runs.

    Between updates nothing of it is mapped, so its 2 bytes per code count in
    the page cache (which the kernel may drop or write back), not in the
    training process's memory.
    """

    def __init__(self, path: Path, header_sha256: str, n_codes: int):
        """``header_sha256``: the base model's (:attr:`qes_edge.model_file.ModelFile.header_sha256`)."""
        self.path = Path(path)
        self.header_sha256 = header_sha256
        self.n_codes = n_codes
        if not self.path.exists():
            self._create()
        self._check_header()

    def mapped(self) -> np.ndarray:
        """The stored residual, one int16 per code, mapped read-write until the array is dropped.

        An update touches nearly every page of it (its support is spread over
        the whole model), so the pages are mapped writable in one call up front
        rather than one fault at a time, which halves an update's time — when
        they fit in RAM.  When they do not (a large model on a small machine),
        populating them all up front would read the whole file only to evict its
        start before the update reaches it; then they fault in as the update
        walks the file in order, and the kernel reads ahead.
        """
        with open(self.path, "r+b") as f:
            view = mmap.mmap(f.fileno(), 0)
        available = mem_available()
        if sys.platform == "linux" and (available is None or len(view) < available // 2):
            try:
                view.madvise(_MADV_POPULATE_WRITE)
            except OSError:  # Linux before 5.14: the pages fault in one at a time
                pass
        return np.frombuffer(view, dtype=np.int16, count=self.n_codes, offset=HEADER_BYTES)

    def _create(self) -> None:
        """Zeros, with the disk blocks reserved now (where the file system can): a full disk is an error
        here, not a fault half way through an update.  The zero pages are made here too, once per run,
        rather than by the first update."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        size = HEADER_BYTES + 2 * self.n_codes
        try:
            with open(tmp, "wb") as f:
                f.write(self._header(updates=0, busy=False))
                f.truncate(size)  # zeros, no writes
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(f.fileno(), 0, size)
            tmp.replace(self.path)
            self.mapped()  # dropped at once: only the page cache keeps its pages
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise QesError(f"{self.path}: cannot make the {size / 2**20:.0f} MiB residual sidecar: "
                           f"{e.strerror or e}") from None

    def _header(self, updates: int, busy: bool) -> bytes:
        fields = _HEADER.pack(SIDECAR_MAGIC, SIDECAR_VERSION, FRACTION_BITS, self.n_codes, updates, int(busy),
                              bytes.fromhex(self.header_sha256))
        return fields.ljust(HEADER_BYTES, b"\0")

    def _read_header(self) -> tuple:
        with open(self.path, "rb") as f:
            raw = f.read(HEADER_BYTES)
        if len(raw) < HEADER_BYTES or raw[:8] != SIDECAR_MAGIC:
            raise QesError(f"{self.path}: not a qes-edge residual sidecar")
        return _HEADER.unpack(raw[:_HEADER.size])

    def _check_header(self) -> None:
        _, version, bits, codes, _, _, header_sha256 = self._read_header()
        if version != SIDECAR_VERSION or bits != FRACTION_BITS:
            raise QesError(f"{self.path}: residual sidecar version {version}/{bits} bits, "
                           f"this qes-edge writes {SIDECAR_VERSION}/{FRACTION_BITS}")
        if header_sha256.hex() != self.header_sha256 or codes != self.n_codes:
            raise QesError(f"{self.path}: residual sidecar belongs to a different base model")
        if self.path.stat().st_size != HEADER_BYTES + 2 * self.n_codes:
            raise QesError(f"{self.path}: residual sidecar is truncated")

    @property
    def updates(self) -> int | None:
        """How many updates the stored residual holds, or None if one was cut off half way."""
        _, _, _, _, updates, busy, _ = self._read_header()
        return None if busy else updates

    def _mark(self, updates: int, busy: bool) -> None:
        with open(self.path, "r+b") as f:
            f.write(self._header(updates, busy))

    def update(self, space: CodeSpace, history: list, gamma: float) -> tuple[int, int]:
        seeds, weights = history[-1]
        held = self.updates
        if held is None or held != len(history) - 1:
            raise QesError(f"{self.path}: residual holds {held} updates, expected {len(history) - 1}")
        self._mark(held, busy=True)
        result = space.update(seeds[None], weights[None], gamma, feedback=True, residual=self.mapped())
        crash_point("residual")  # the residual is half written: its header still says busy
        self._mark(held + 1, busy=False)
        return result

    def flush(self) -> None:
        """Put the residual on disk (the working copy does, when it closes or cannot tell a reboot)."""
        with open(self.path, "r+b") as f:
            os.fsync(f.fileno())
