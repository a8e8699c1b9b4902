"""Ollama in and out: ollama:NAME[:TAG] from a store laid out as Ollama's, and the Modelfile of a tuned model.

The stores are made on disk by the tests (tests/ollama_store.py: blobs named by digest, manifests listing them);
OLLAMA_MODELS points at them, so a real ~/.ollama is never read or written.
"""

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

from helpers import invoke, one_line_error
from ollama_store import (OLLAMA_PARAMS, OLLAMA_SYSTEM, OLLAMA_TEMPLATE, ollama_layer, ollama_manifest,
                          ollama_model_layers)
from qes_edge.errors import QesError
from qes_edge.ollama import modelfile_lines, resolve

FAKE_GGUF = b"GGUF not really a model"


def snapshot(root: Path) -> dict:
    """Every file of a store with its bytes' sha256 and its mode and mtime: any write shows."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mode, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def small_store(tmp_path, monkeypatch):
    """A store whose 'GGUF' is a few bytes: enough to resolve names, not to run."""
    root = tmp_path / "models"
    ollama_manifest(root, "smollm2", "135m", ollama_model_layers(root, FAKE_GGUF))
    ollama_manifest(root, "smollm2", "latest", ollama_model_layers(root, FAKE_GGUF))
    ollama_manifest(root, "someone/smol", "q4", ollama_model_layers(root, FAKE_GGUF))
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    return root


@pytest.mark.unit
@pytest.mark.parametrize("reference, shown", [
    ("ollama:smollm2:135m", "ollama:smollm2:135m"),
    ("ollama:smollm2", "ollama:smollm2:latest"),
    ("ollama:someone/smol:q4", "ollama:someone/smol:q4"),
    ("ollama:registry.ollama.ai/library/smollm2:135m", "ollama:smollm2:135m"),
])
def test_a_name_resolves_to_its_model_blob_and_modelfile_layers(small_store, reference, shown):
    model = resolve(reference)
    digest = hashlib.sha256(FAKE_GGUF).hexdigest()
    assert model.reference == shown
    assert model.blob == small_store / "blobs" / f"sha256-{digest}"
    assert (model.template, model.system, model.parameters) == (OLLAMA_TEMPLATE, OLLAMA_SYSTEM, OLLAMA_PARAMS)


@pytest.mark.unit
def test_without_ollama_models_the_store_is_in_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("OLLAMA_MODELS", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    root = tmp_path / ".ollama" / "models"
    ollama_manifest(root, "smollm2", "latest", ollama_model_layers(root, FAKE_GGUF))
    assert resolve("ollama:smollm2").blob.parent == root / "blobs"


@pytest.mark.unit
def test_bad_names_and_broken_stores_are_one_line(small_store):
    kind = "application/vnd.ollama.image."
    ollama_manifest(small_store, "nomodel", "latest", [ollama_layer(small_store, kind + "template", b"{{ .Prompt }}")])
    gone = ollama_layer(small_store, kind + "model", b"GGUF soon gone")
    ollama_manifest(small_store, "gone", "latest", [gone])
    (small_store / "blobs" / f"sha256-{gone['digest'][7:]}").unlink()
    short = ollama_layer(small_store, kind + "model", b"GGUF cut")
    ollama_manifest(small_store, "short", "latest", [{**short, "size": 999}])
    (small_store / "manifests" / "registry.ollama.ai" / "library" / "garbled").mkdir()
    (small_store / "manifests" / "registry.ollama.ai" / "library" / "garbled" / "latest").write_text("{not json")
    before = snapshot(small_store)
    cases = {
        "ollama:nothere": "ollama:nothere:latest is not in the Ollama store",
        "ollama:smollm2:7b": "ollama:smollm2:7b is not in the Ollama store",
        "ollama:nomodel": "ollama:nomodel:latest: its manifest",
        "ollama:gone": "ollama:gone:latest: the blob of its model layer is missing from the store",
        "ollama:short": "has 8 bytes, its manifest says 999",
        "ollama:garbled": "ollama:garbled:latest: cannot read its manifest",
        "ollama:../../etc/passwd": "not an Ollama model: 'ollama:../../etc/passwd'",
        "ollama:a/b/c/d": "not an Ollama model",
    }
    for reference, message in cases.items():
        with pytest.raises(QesError) as caught:
            resolve(reference)
        assert message in str(caught.value) and "\n" not in str(caught.value), reference
    assert "has no model layer (application/vnd.ollama.image.model)" in str(pytest.raises(QesError, resolve,
                                                                                         "ollama:nomodel").value)
    assert snapshot(small_store) == before


@pytest.mark.unit
def test_the_modelfile_of_a_model_from_ollama_carries_its_template_system_and_parameters(small_store):
    lines = modelfile_lines(Path("/runs/tuned.gguf"), resolve("ollama:smollm2:135m").record())
    assert lines == [
        "FROM ./tuned.gguf",
        f'TEMPLATE """{OLLAMA_TEMPLATE}"""',
        f'SYSTEM """{OLLAMA_SYSTEM}"""',
        'PARAMETER stop "<|im_start|>"',
        'PARAMETER stop "<|im_end|>"',
        "PARAMETER temperature 0.2",
    ]


# ---- train ollama:NAME and export --ollama, on the real model ----------------------------------------

def fake_ollama(bin_dir: Path) -> Path:
    """An `ollama` that writes down its arguments and the Modelfile it was given."""
    bin_dir.mkdir()
    script = bin_dir / "ollama"
    script.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/called"\ncp "$4" "$(dirname "$0")/given"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def test_train_an_ollama_model_and_hand_it_back(ollama_store, default_model, workspace, tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama_store))
    before = snapshot(ollama_store)
    reward = f"{workspace / 'rewards_for_tests.py'}:score"
    result = invoke("train", "ollama:smollm2:135m", "--task", workspace / "data.jsonl", "--reward", reward, *tiny,
                    "--run-dir", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"run {tmp_path / 'run'}  model ollama:smollm2:135m  task ")
    tuned = tmp_path / "run" / "smollm2-135m.qes.gguf"
    assert tuned.is_file() and "tuned model: " + str(tuned) in result.output
    assert snapshot(ollama_store) == before  # the store is only read

    # not installed: the command to run is printed
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))
    out = tmp_path / "out" / "smol-tuned.gguf"
    out.parent.mkdir()
    result = invoke("export", tmp_path / "run", "--out", out, "--ollama")
    assert result.exit_code == 0, result.output
    modelfile = out.parent / "Modelfile"
    assert modelfile.read_text() == "\n".join([
        "FROM ./smol-tuned.gguf", f'TEMPLATE """{OLLAMA_TEMPLATE}"""', f'SYSTEM """{OLLAMA_SYSTEM}"""',
        'PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"', "PARAMETER temperature 0.2"]) + "\n"
    assert result.output.splitlines()[-1] == \
        f"ollama is not on PATH; to add the model to Ollama: ollama create smol-tuned -f {modelfile}"

    # installed: it is run
    monkeypatch.setenv("PATH", f"{fake_ollama(tmp_path / 'bin')}{os.pathsep}{path}")
    result = invoke("export", tmp_path / "run", "--out", out, "--ollama")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bin" / "called").read_text().split() == ["create", "smol-tuned", "-f", str(modelfile)]
    assert (tmp_path / "bin" / "given").read_text() == modelfile.read_text()
    assert result.output.splitlines()[-1] == "created the Ollama model smol-tuned"
    assert snapshot(ollama_store) == before


def test_an_ollama_name_that_is_not_there_writes_nothing(ollama_store, tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama_store))
    message = one_line_error(invoke("train", "ollama:llama3", "--run-dir", tmp_path / "run"))
    assert message.startswith("Error: ollama:llama3:latest is not in the Ollama store")
    assert not (tmp_path / "run").exists()
    # and a model from a namespace is found
    result = invoke("eval", "ollama:someone/smol", "--heldout", "2", "--threads", "2")
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ollama:someone/smol:latest on arithmetic (n=2)")
