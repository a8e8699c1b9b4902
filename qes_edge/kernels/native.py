"""The C twin of the Numba kernels (``native/qes_kernels.c``), loaded with ctypes.

The functions here take the same arguments as their Numba twins
(:func:`~qes_edge.kernels.perturb.perturb_codes`,
:func:`~qes_edge.kernels.update.es_update`,
:func:`~qes_edge.kernels.noise.sample_tensor`) and give bit-identical results;
each named tuple becomes the C struct of the same fields, and the C code reads
the numpy arrays in place.  ``threads`` defaults to what
Numba would use: ``NUMBA_NUM_THREADS`` when set, else OpenMP's default
(``OMP_NUM_THREADS``, else every core).

:func:`select` picks the kernel set: ``QES_EDGE_KERNELS=numba|native`` forces
one, otherwise the library is used when it was built.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from pathlib import Path

import numpy as np

from ..errors import QesError
from .noise import CHUNK, GUIDE_BITS
from .update import FRACTION_BITS

ABI_VERSION = 4
LIBRARY_DIR = Path(__file__).with_name("_native")
LIBRARY_NAME = {"win32": "qes_kernels.dll", "darwin": "libqes_kernels.dylib"}.get(sys.platform, "libqes_kernels.so")
ENV = "QES_EDGE_KERNELS"
BUILD_HINT = ("for the native kernels install a C compiler and CMake (Debian, Ubuntu, Raspberry Pi OS: "
              "sudo apt install build-essential cmake) and reinstall qes-edge")

log = logging.getLogger(__name__)

_i64, _u64 = ctypes.c_int64, ctypes.c_uint64
_ptr = ctypes.c_void_p


class _Layout(ctypes.Structure):
    _fields_ = [("low_byte", _ptr), ("low_shift", _ptr), ("high_byte", _ptr), ("high_shift", _ptr),
                ("params", _ptr), ("width", _i64)]


class _Tensors(ctypes.Structure):
    _fields_ = [("keys", _ptr), ("info", _ptr), ("chunks", _ptr), ("n_chunks", _i64)]


class _Noise(ctypes.Structure):
    _fields_ = [("gap_tail", _ptr), ("gap_len", _i64), ("guide", _ptr), ("magnitude_tail", _ptr),
                ("magnitude_len", _i64)]


class _Update(ctypes.Structure):
    _fields_ = [("seeds", _ptr), ("supports", _ptr), ("weights", _ptr), ("rows", _i64), ("pairs", _i64),
                ("gamma_fx", _i64),
                ("feedback", ctypes.c_int), ("stored_residual", ctypes.c_int)]


class NativeUnavailable(Exception):
    """Why the native library cannot be used (not built, stale, or unloadable)."""


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    path = LIBRARY_DIR / LIBRARY_NAME
    if not path.is_file():
        raise NativeUnavailable(f"{path} is not built")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise NativeUnavailable(f"cannot load {path}: {e}") from None
    # An ABI 1 library writes five constants: room for them, so the version check can refuse it.
    constants = (_i64 * 5)()
    lib.qes_constants(constants)
    if tuple(constants[:4]) != (ABI_VERSION, CHUNK, GUIDE_BITS, FRACTION_BITS):
        raise NativeUnavailable(f"{path} is stale (built from other sources); rebuild it")
    layout, tensors, noise = ctypes.POINTER(_Layout), ctypes.POINTER(_Tensors), ctypes.POINTER(_Noise)
    lib.qes_sample_tensor.restype = _i64
    lib.qes_sample_tensor.argtypes = [_i64, _i64, _u64, _i64, noise, _ptr, _ptr, _i64]
    lib.qes_perturb_codes.restype = _i64
    lib.qes_perturb_codes.argtypes = [_ptr, layout, tensors, noise, _i64, _i64, _i64, _ptr, ctypes.c_int]
    lib.qes_es_update.restype = ctypes.c_int
    lib.qes_es_update.argtypes = [_ptr, layout, tensors, noise, ctypes.POINTER(_Update), _ptr, _ptr, ctypes.c_int]
    return lib


def unavailable_reason() -> str | None:
    """None when the native kernels can be used, else one line saying why not."""
    try:
        _library()
    except NativeUnavailable as e:
        return str(e)
    return None


def select(requested: str | None = None) -> str:
    """The kernel set to use: ``requested``, else ``$QES_EDGE_KERNELS``, else native when built."""
    choice = (requested or os.environ.get(ENV) or "auto").strip().lower()
    if choice not in ("auto", "native", "numba"):
        raise QesError(f"{ENV} must be 'numba' or 'native', got {choice!r}")
    if choice == "numba":
        return "numba"
    reason = unavailable_reason()
    if reason is None:
        return "native"
    if choice == "native":
        raise QesError(f"native kernels requested but unavailable: {reason} (see docs/native-kernels.md)")
    _notice_fallback(reason)
    return "numba"


@functools.lru_cache(maxsize=None)
def _notice_fallback(reason: str) -> None:
    log.warning("qes-edge: native kernels unavailable (%s); using the Numba kernels (%s)", reason, BUILD_HINT)


def default_threads() -> int:
    """0 (OpenMP's default: OMP_NUM_THREADS, else all cores) unless NUMBA_NUM_THREADS says otherwise."""
    try:
        return max(0, int(os.environ.get("NUMBA_NUM_THREADS", "0")))
    except ValueError:
        return 0


def _address(array: np.ndarray, dtype, writable: bool = False) -> int:
    """The data pointer of a C-contiguous ``dtype`` array; never a silent copy."""
    if array.dtype != dtype or not array.flags.c_contiguous:
        raise TypeError(f"native kernels need a C-contiguous {np.dtype(dtype)} array, got {array.dtype}")
    if writable and not array.flags.writeable:
        raise ValueError("native kernels write to this array, but it is read-only")
    return array.ctypes.data


def _layout(layout) -> _Layout:
    tables = [_address(a, np.int64) for a in (layout.low_byte, layout.low_shift, layout.high_byte, layout.high_shift)]
    shapes = {a.shape for a in (layout.low_byte, layout.low_shift, layout.high_byte, layout.high_shift)}
    if len(shapes) != 1 or layout.params.shape[1] != 7:
        raise ValueError("layout tables disagree in shape")
    return _Layout(*tables, _address(layout.params, np.int64), layout.low_byte.shape[1])


def _tensors(tensors) -> _Tensors:
    keys, info, chunks = tensors.keys, tensors.info, tensors.chunks
    if info.shape[1:] != (3,) or chunks.shape[1:] != (3,) or keys.shape != info.shape[:1]:
        raise ValueError("the tensor table's keys, info and chunks disagree in shape")
    return _Tensors(_address(keys, np.uint64), _address(info, np.int64), _address(chunks, np.int64), chunks.shape[0])


def _noise(noise) -> _Noise:
    if noise.guide.shape != (1 << GUIDE_BITS,):
        raise ValueError(f"guide table must have {1 << GUIDE_BITS} entries")
    return _Noise(_address(noise.gap_tail, np.uint64), noise.gap_tail.shape[0], _address(noise.guide, np.int64),
                  _address(noise.magnitude_tail, np.uint64), noise.magnitude_tail.shape[0])


def _update(update) -> _Update:
    seeds, supports, weights = update.seeds, update.supports, update.weights
    if seeds.ndim != 2 or seeds.shape != weights.shape or seeds.shape[0] < 1 or supports.shape != seeds.shape[:1]:
        raise ValueError(f"seeds and weights must be the same [rows >= 1, pairs] shape with a support per row, "
                         f"got {seeds.shape}, {weights.shape}, {supports.shape}")
    return _Update(_address(seeds, np.int64), _address(supports, np.int64), _address(weights, np.int64),
                   seeds.shape[0], seeds.shape[1], int(update.gamma_fx), int(bool(update.feedback)),
                   int(bool(update.stored_residual)))


def _codes_spanned(tensors) -> int:
    """One past the highest global code index the chunks reach: what gated and residual must cover."""
    chunks = tensors.chunks
    return int((tensors.info[chunks[:, 0], 2] + chunks[:, 2]).max()) if chunks.shape[0] else 0


def _threads(threads) -> int:
    return default_threads() if threads is None else int(threads)


def sample_tensor(seed, support, key, n_elements, noise):
    """All non-zero (element, delta) of one tensor, as :func:`qes_edge.kernels.noise.sample_tensor`."""
    lib = _library()
    noise_struct = _noise(noise)
    gap_tail = noise.gap_tail
    density = 1.0 - float(gap_tail[1]) / 2**64 if gap_tail.shape[0] > 1 else 1.0  # gap_tail[1] = P(delta == 0)
    capacity = int(n_elements * density * 1.1) + 64  # one call almost always; else a second with the count
    while True:
        positions = np.empty(capacity, dtype=np.int64)
        deltas = np.empty(capacity, dtype=np.int8)
        count = lib.qes_sample_tensor(int(seed), int(support), int(key), int(n_elements), ctypes.byref(noise_struct),
                                      positions.ctypes.data, deltas.ctypes.data, capacity)
        if count <= capacity:
            return positions[:count], deltas[:count]
        capacity = count


def perturb_codes(buf, layout, tensors, noise, undo, apply, support, gated, threads=None):
    """Take seed ``undo``'s perturbation off and put seed ``apply``'s on, as :func:`qes_edge.kernels.perturb.perturb_codes`."""
    lib = _library()
    if gated.shape[0] * 8 < _codes_spanned(tensors):
        raise ValueError("gated has fewer bits than the space has codes")
    changed = lib.qes_perturb_codes(_address(buf, np.uint8, True), ctypes.byref(_layout(layout)),
                                    ctypes.byref(_tensors(tensors)), ctypes.byref(_noise(noise)), int(undo),
                                    int(apply), int(support), _address(gated, np.uint8, True), _threads(threads))
    if changed < 0:
        raise MemoryError("native perturb_codes: cannot allocate scratch memory")
    return changed


def es_update(buf, layout, tensors, noise, update, residual, threads=None):
    """One error-feedback update, as :func:`qes_edge.kernels.update.es_update`; returns (stepped, blocked)."""
    lib = _library()
    stored = bool(update.stored_residual)
    if stored and residual.shape[0] < _codes_spanned(tensors):
        raise ValueError(f"residual has {residual.shape[0]} codes, fewer than the space's")
    counts = np.zeros(2, dtype=np.int64)
    status = lib.qes_es_update(_address(buf, np.uint8, True), ctypes.byref(_layout(layout)),
                               ctypes.byref(_tensors(tensors)), ctypes.byref(_noise(noise)),
                               ctypes.byref(_update(update)), _address(residual, np.int16, stored),
                               counts.ctypes.data, _threads(threads))
    if status != 0:
        raise MemoryError("native es_update: cannot allocate scratch memory")
    return int(counts[0]), int(counts[1])
