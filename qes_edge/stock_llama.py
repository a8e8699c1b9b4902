"""llama-cpp-python's own ``Llama``, opened as a user opens it, on every build this project meets.

One build needs care: llama-cpp-python compiled with ``-march=native`` (its default) on an x86 CPU with
AMX-INT8 (Intel Xeon from the 4th generation, Sapphire Rapids, on) carries llama.cpp's AMX matrix kernel,
and that kernel segfaults at the first decode of these models (llama.cpp issue 20824, closed without a
fix), the base models as much as tuned ones. It runs only on weights llama.cpp has copied into its extra
(repacked) buffers, so a model loaded without them (``use_extra_bufts`` off, llama-cli's ``--no-repack``)
runs on the ordinary CPU kernels, as the trainer's own evaluator always does. ``Llama`` takes no argument
for it: on such a build its default model parameters are swapped for the duration of the load.
"""

from __future__ import annotations

import os

import llama_cpp
from llama_cpp import llama_cpp as llama


def amx_kernel_built() -> bool:
    """Whether the installed llama.cpp was compiled with its AMX-INT8 kernel."""
    return b"AMX_INT8 = 1" in llama.llama_print_system_info()


def stock_llama(model_path: str | os.PathLike, *, repack: bool | None = None, **kwargs) -> llama_cpp.Llama:
    """``llama_cpp.Llama(model_path, **kwargs)``. repack None keeps llama.cpp's extra (repacked) buffers
    except on a build with the AMX kernel; False loads without them, as the trainer's evaluator does."""
    if repack or (repack is None and not amx_kernel_built()):
        return llama_cpp.Llama(model_path=str(model_path), **kwargs)
    default_params = llama.llama_model_default_params

    def without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama.llama_model_default_params = without_extra_buffers
    try:
        return llama_cpp.Llama(model_path=str(model_path), **kwargs)
    finally:
        llama.llama_model_default_params = default_params
