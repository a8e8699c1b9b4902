"""The trainable codes of a model as one space the kernels walk: tensors, chunks, layouts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numba
import numpy as np

from ..formats import QuantFormat, format_of
from ..phases import PERTURB, timed
from . import native
from .codes import layout_tables
from .noise import CHUNK, NoiseTable, support_seed, tensor_key
from .perturb import perturb_codes
from .update import Update, es_update, to_fixed


@dataclass(frozen=True)
class TensorSlot:
    """Where one trainable tensor's blocks are in the buffer."""

    name: str
    ggml_type: int
    offset: int  # byte offset of the tensor data in the buffer
    n_elements: int


class TensorTable(NamedTuple):
    """The trainable tensors as the kernels walk them, in tensor order."""

    keys: np.ndarray  # uint64 [tensors]: the stream key of each tensor (tensor_key of its name)
    info: np.ndarray  # int64 [tensors, 3]: byte offset in the buffer, format index, global index of its first code
    chunks: np.ndarray  # int64 [chunks, 3]: tensor, first element, end element; CHUNK elements at most


class CodeSpace:
    """All trainable codes in ``buf`` (the working copy's memory map, or any uint8 array).

    Codes are numbered globally in tensor order; that numbering indexes the
    residual and the gating bitmap.  Streams are keyed by tensor *name*, so
    a tensor's perturbations do not depend on which other tensors train.

    ``kernels``: "numba" or "native" (the bit-identical C twin); by default
    ``$QES_EDGE_KERNELS``, else native when its library is built.

    ``threads``: the threads a perturb or restore takes (None: every core).  A
    replica that decodes beside others sets it to its own llama.cpp threads,
    so that its kernels do not compete with the others' decoding; an update,
    which runs while no replica decodes, always takes every core.
    """

    def __init__(self, buf: np.ndarray, tensors: list[TensorSlot], sigma: float, kernels: str | None = None):
        self.kernels = native.select(kernels)
        self._perturb_codes, self._es_update = _KERNELS[self.kernels]
        self.buf = buf
        self.tensors = list(tensors)
        self.noise = NoiseTable.for_sigma(sigma)
        formats: list[QuantFormat] = []
        info = np.zeros((len(self.tensors), 3), dtype=np.int64)
        chunk_rows, code_base = [], 0
        for t, slot in enumerate(self.tensors):
            fmt = format_of(slot.ggml_type)
            if fmt is None:
                raise ValueError(f"{slot.name}: type {slot.ggml_type} has no trainable codes")
            if slot.n_elements % fmt.block_elems:
                raise ValueError(f"{slot.name}: {slot.n_elements} elements is not whole {fmt.name} blocks")
            if fmt not in formats:
                formats.append(fmt)
            info[t] = (slot.offset, formats.index(fmt), code_base)
            chunk_rows += [(t, s, min(s + CHUNK, slot.n_elements)) for s in range(0, slot.n_elements, CHUNK)]
            code_base += slot.n_elements
        self.formats = formats
        self.n_codes = code_base
        self.layout = layout_tables(formats) if formats else None
        self.table = TensorTable(np.array([tensor_key(s.name) for s in self.tensors], dtype=np.uint64), info,
                                 np.array(chunk_rows, dtype=np.int64).reshape(-1, 3))
        self.gated = np.zeros((self.n_codes + 7) // 8, dtype=np.uint8)
        self.threads: int | None = None

    def perturb(self, seed: int, support: int) -> int:
        """Add the perturbation of ``seed`` on the support of ``support`` (gated at the code range).

        ``support``: the iteration's :func:`~qes_edge.kernels.noise.support_seed`.  Returns codes changed.
        """
        if not seed:
            raise ValueError("a perturbation's seed is non-zero (0 means none)")
        return self.swap(0, seed, support)

    def restore(self, seed: int, support: int) -> int:
        """Undo :meth:`perturb` of the same seed and support, giving back the exact original bytes."""
        if not seed:
            raise ValueError("a perturbation's seed is non-zero (0 means none)")
        return self.swap(seed, 0, support)

    @timed(PERTURB)
    def swap(self, worn: int, seed: int, support: int) -> int:
        """Restore the perturbation of ``worn`` and perturb by ``seed``, both of ``support``, in one walk
        of the support: the bytes and gating bits of :meth:`restore` then :meth:`perturb`.  A seed of 0
        is none.  Returns the codes ``seed`` changed (with no ``seed``, the codes restored)."""
        return int(self._perturb_codes(self.buf, self.layout, self.table, self.noise, np.int64(worn),
                                       np.int64(seed), np.int64(support), self.gated, self.threads))

    def update(self, seeds: np.ndarray, weights: np.ndarray, gamma: float, feedback: bool,
               residual: np.ndarray | None) -> tuple[int, int]:
        """One ES update (see :mod:`qes_edge.kernels.update`); returns (codes stepped, steps blocked).

        ``seeds``/``weights``: int64 [rows, pairs]; the last row is this
        iteration, earlier rows are replayed to rebuild the residual; each row's
        support seed is :func:`~qes_edge.kernels.noise.support_seed` of its seeds.
        ``residual``: the stored residual (int16 per code) or None to start from zero.
        """
        seeds = np.ascontiguousarray(seeds, dtype=np.int64).reshape(-1, np.shape(seeds)[-1])
        weights = np.ascontiguousarray(weights, dtype=np.int64).reshape(seeds.shape)
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"decay gamma must be in [0, 1], got {gamma}")
        stored = residual is not None
        if not stored:
            residual = np.zeros(1, dtype=np.int16)
        elif residual.shape != (self.n_codes,):
            raise ValueError(f"residual has {residual.shape} codes, the model has {self.n_codes}")
        supports = np.array([support_seed(row) for row in seeds], dtype=np.int64)
        update = Update(seeds, supports, weights, np.int64(to_fixed(gamma)), bool(feedback), stored)
        stepped, blocked = self._es_update(self.buf, self.layout, self.table, self.noise, update, residual)
        return int(stepped), int(blocked)


def _numba_perturb(buf, layout, tensors, noise, undo, apply, support, gated, threads=None):
    """The Numba perturb on ``threads`` threads of this thread's team (Numba's setting is per thread)."""
    if threads is None:
        return perturb_codes(buf, layout, tensors, noise, undo, apply, support, gated)
    previous = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        return perturb_codes(buf, layout, tensors, noise, undo, apply, support, gated)
    finally:
        numba.set_num_threads(previous)


_KERNELS = {"numba": (_numba_perturb, es_update), "native": (native.perturb_codes, native.es_update)}
