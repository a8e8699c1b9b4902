"""Numba kernels: seeded sparse perturbation, gated apply/restore, the error-feedback update."""

from .noise import CHUNK, SCHEME, NoiseTable, sample_tensor, tensor_key
from .space import CodeSpace, TensorSlot
from .update import FRACTION_BITS, to_fixed

__all__ = ["CHUNK", "SCHEME", "NoiseTable", "sample_tensor", "tensor_key", "CodeSpace", "TensorSlot",
           "FRACTION_BITS", "to_fixed"]
