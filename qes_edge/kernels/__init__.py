"""Numba kernels: seeded sparse perturbation, gated apply/restore, the error-feedback update.

The kernels take their read-only tables as named tuples (:class:`Layout`,
:class:`TensorTable`, :class:`NoiseTable`, :class:`Update`), which Numba types
field by field and ``native.py`` turns into the C twin's structs; adding an
input is adding a field to one of them, in Python and in ``native/qes_kernels.h``.
What a kernel writes (the buffer, the gating bits, the residual) is an argument
of its own: Numba's parallel loop can drop stores into an array reached
through a tuple.  The per-code helpers (draw_gap, read_code, ...) take plain
arrays, unpacked once per call or chunk: field access in their hot loops
makes Numba's code about a third slower.
"""

from .codes import Layout
from .noise import CHUNK, SCHEME, NoiseTable, sample_tensor, support_seed, tensor_key
from .space import CodeSpace, TensorSlot, TensorTable
from .update import FRACTION_BITS, Update, to_fixed

__all__ = ["CHUNK", "SCHEME", "Layout", "NoiseTable", "sample_tensor", "support_seed", "tensor_key", "CodeSpace",
           "TensorSlot", "TensorTable", "FRACTION_BITS", "Update", "to_fixed"]
