"""A Modelfile so that `ollama create` picks up a tuned GGUF with the right stop tokens."""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader

from .errors import QesError

_STOP_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def end_of_turn_tokens(model: Path) -> list[str]:
    """The text of the model's end-of-sequence / end-of-turn tokens, from its GGUF metadata."""
    reader = GGUFReader(model, "r")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    found = []
    for key in _STOP_KEYS:
        field = reader.fields.get(key)
        if field is None or tokens is None:
            continue
        token_id = int(field.parts[field.data[0]][0])
        text = bytes(tokens.parts[tokens.data[token_id]]).decode("utf-8", errors="replace")
        if text not in found:
            found.append(text)
    return found


def write_modelfile(model: Path) -> Path:
    model = Path(model)
    stops = end_of_turn_tokens(model)
    lines = [f"FROM ./{model.name}"] + [f'PARAMETER stop "{s}"' for s in stops]
    path = model.with_name("Modelfile")
    try:
        path.write_text("\n".join(lines) + "\n")
    except OSError as e:
        raise QesError(f"cannot write {path}: {e.strerror}") from None
    return path
