"""Ollama in and out: a model from Ollama's store (``ollama:NAME[:TAG]``), and a Modelfile for ``ollama create``.

Ollama keeps its models in ``$OLLAMA_MODELS``, else ``~/.ollama/models``: a
manifest per model at ``manifests/<registry>/<namespace>/<name>/<tag>`` (JSON:
its layers, each a media type, a sha256 digest and a size) and every layer's
bytes in ``blobs/sha256-<hex>``.  The GGUF is the layer of media type
``application/vnd.ollama.image.model``; the chat template, the system prompt and
the parameters (JSON) are layers of their own.  qes-edge only ever reads the store.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from gguf import GGUFReader

from .errors import QesError

PREFIX = "ollama:"
REGISTRY = "registry.ollama.ai"
MEDIA_TYPE = "application/vnd.ollama.image."  # + model, template, system, params
_COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_STOP_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


@dataclass(frozen=True)
class OllamaModel:
    """A model in Ollama's store: its GGUF blob, and what its Modelfile said besides FROM."""

    reference: str  # ollama:NAME:TAG, the tag filled in
    blob: Path
    template: str | None = None
    system: str | None = None
    parameters: dict = field(default_factory=dict)

    def record(self) -> dict:
        """What a run keeps of it (state.json) to write the tuned model's Modelfile."""
        return {"model": self.reference, "template": self.template, "system": self.system,
                "parameters": self.parameters}


def is_reference(text: str) -> bool:
    return text.startswith(PREFIX)


def store() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models")


def stem(reference: str) -> str:
    """A file-name stem for a model reference: ollama:smollm2:135m -> smollm2-135m."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", reference[len(PREFIX):]).strip("-")


def resolve(reference: str) -> OllamaModel:
    """The model ``ollama:[[REGISTRY/]NAMESPACE/]NAME[:TAG]`` in the store; one QesError line if it is not there whole."""
    path, _, last = reference[len(PREFIX):].rpartition("/")
    name, _, tag = last.partition(":")
    parts = [*(path.split("/") if path else []), name]
    tag = tag or "latest"
    if len(parts) > 3 or not all(_COMPONENT.fullmatch(p) for p in (*parts, tag)):
        raise QesError(f"not an Ollama model: {reference!r} (expected ollama:NAME[:TAG] or ollama:NAMESPACE/NAME[:TAG])")
    parts = {1: [REGISTRY, "library"], 2: [REGISTRY], 3: []}[len(parts)] + parts
    shown = f"{PREFIX}{'/'.join(parts[1:]) if parts[1] != 'library' else parts[2]}:{tag}"
    root = store()
    manifest_path = root.joinpath("manifests", *parts, tag)
    if not manifest_path.is_file():
        raise QesError(f"{shown} is not in the Ollama store {root} (no {manifest_path}); `ollama pull` it first")
    try:
        layers = json.loads(manifest_path.read_text())["layers"]
        by_type = {layer["mediaType"]: layer for layer in layers}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QesError(f"{shown}: cannot read its manifest {manifest_path} ({type(e).__name__}: {e})") from None
    if MEDIA_TYPE + "model" not in by_type:
        raise QesError(f"{shown}: its manifest {manifest_path} has no model layer ({MEDIA_TYPE}model)")

    def blob(kind: str) -> Path | None:
        layer = by_type.get(MEDIA_TYPE + kind)
        if layer is None:
            return None
        digest = _DIGEST.fullmatch(str(layer.get("digest")))
        if digest is None:
            raise QesError(f"{shown}: its {kind} layer has a malformed digest {layer.get('digest')!r}")
        path = root / "blobs" / f"sha256-{digest.group(1)}"
        if not path.is_file():
            raise QesError(f"{shown}: the blob of its {kind} layer is missing from the store ({path})")
        if path.stat().st_size != layer.get("size"):
            raise QesError(f"{shown}: the blob {path} has {path.stat().st_size:,} bytes, its manifest says "
                           f"{layer.get('size')}")
        return path

    def text(kind: str) -> str | None:
        path = blob(kind)
        return path.read_text(encoding="utf-8", errors="replace") if path else None

    try:
        parameters = json.loads(text("params") or "{}")
    except ValueError:
        parameters = None
    if not isinstance(parameters, dict):
        raise QesError(f"{shown}: its params layer is not a JSON object")
    return OllamaModel(shown, blob("model"), text("template"), text("system"), parameters)


# ---- out: a Modelfile beside a tuned GGUF ---------------------------------------------------------

def end_of_turn_tokens(model: Path) -> list[str]:
    """The text of the model's end-of-sequence / end-of-turn tokens, from its GGUF metadata."""
    reader = GGUFReader(model, "r")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    found = []
    for key in _STOP_KEYS:
        item = reader.fields.get(key)
        if item is None or tokens is None:
            continue
        token_id = int(item.parts[item.data[0]][0])
        text = bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8", errors="replace")
        if text not in found:
            found.append(text)
    return found


def modelfile_lines(model: Path, source: dict | None) -> list[str]:
    """FROM the tuned GGUF; then, for a run that came from Ollama (``source``: its record), the source's
    TEMPLATE, SYSTEM and PARAMETER lines, else the GGUF's end-of-turn tokens as stop parameters."""
    lines = [f"FROM ./{model.name}"]
    if source is None:
        return lines + [f"PARAMETER stop {json.dumps(s)}" for s in end_of_turn_tokens(model)]
    if source.get("template"):
        lines.append(f'TEMPLATE """{source["template"]}"""')
    if source.get("system"):
        lines.append(f'SYSTEM """{source["system"]}"""')
    for key, value in source.get("parameters", {}).items():
        for one in value if isinstance(value, list) else [value]:
            lines.append(f"PARAMETER {key} {json.dumps(one)}")
    return lines


def write_modelfile(model: Path, source: dict | None = None) -> Path:
    """``Modelfile`` beside ``model`` (see :func:`modelfile_lines`)."""
    model = Path(model)
    path = model.with_name("Modelfile")
    try:
        path.write_text("\n".join(modelfile_lines(model, source)) + "\n")
    except OSError as e:
        raise QesError(f"cannot write {path}: {e.strerror}") from None
    return path


def create_command(model: Path, modelfile: Path) -> list[str]:
    """``ollama create NAME -f MODELFILE``, NAME from the tuned GGUF's file name."""
    return ["ollama", "create", re.sub(r"[^A-Za-z0-9_-]+", "-", Path(model).stem).strip("-").lower(),
            "-f", str(modelfile)]
