"""A store laid out as Ollama lays it out: blobs named by their sha256 digest, manifests that list them."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

OLLAMA_TEMPLATE = "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n<|im_start|>assistant\n"
OLLAMA_SYSTEM = "You are a helpful AI assistant named SmolLM."
OLLAMA_PARAMS = {"stop": ["<|im_start|>", "<|im_end|>"], "temperature": 0.2}


def ollama_layer(root: Path, media_type: str, data: bytes) -> dict:
    """A blob in ``root/blobs`` named by its digest, and the manifest's entry for it."""
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "blobs" / f"sha256-{digest}").write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def ollama_manifest(root: Path, name: str, tag: str, layers: list[dict]) -> Path:
    """manifests/registry.ollama.ai/<library/NAME or NAMESPACE/NAME>/TAG listing ``layers``."""
    parts = name.split("/") if "/" in name else ["library", name]
    path = root.joinpath("manifests", "registry.ollama.ai", *parts, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = ollama_layer(root, "application/vnd.docker.container.image.v1+json", b'{"model_format":"gguf"}')
    path.write_text(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                                "config": config, "layers": layers}))
    return path


def ollama_model_layers(root: Path, gguf_bytes: bytes) -> list[dict]:
    """The layers `ollama pull smollm2` gives: the GGUF, its template, system prompt and parameters."""
    kind = "application/vnd.ollama.image."
    return [ollama_layer(root, kind + "model", gguf_bytes), ollama_layer(root, kind + "template", OLLAMA_TEMPLATE.encode()),
            ollama_layer(root, kind + "system", OLLAMA_SYSTEM.encode()),
            ollama_layer(root, kind + "params", json.dumps(OLLAMA_PARAMS).encode())]
