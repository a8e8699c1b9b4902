"""What a GGUF holds and what QES may train in it: :func:`open_model` reads and validates a file read-only.

The user's file is only ever opened read-only.  Training happens in a working
copy that numpy maps read-write while llama.cpp maps the same pages read-only,
so an edited code is what the next forward pass multiplies with.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
from gguf import GGMLQuantizationType

from .errors import QesError
from .files import describe, file_sha256
from .formats import format_of
from .gguf_header import TableEntry, scan, shown


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file, located by absolute byte offset."""

    name: str
    ggml_type: int
    type_name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (the contiguous row length) first
    n_elements: int
    offset: int  # absolute byte offset of the tensor data in the file
    n_bytes: int
    trainable: bool
    reason: str  # why the tensor is frozen; "" when trainable


@dataclass
class ModelFile:
    """What ``open_model`` learned about a GGUF; holds no open file."""

    path: Path
    version: int
    alignment: int
    data_offset: int  # absolute offset of the tensor data section
    file_size: int
    tensors: list[TensorInfo]
    metadata: dict[str, object]  # scalar and string metadata; arrays are left out
    header_sha256: str
    _sha256: str | None = field(default=None, repr=False, compare=False)

    @property
    def trainable(self) -> list[TensorInfo]:
        return [t for t in self.tensors if t.trainable]

    @property
    def trainable_codes(self) -> int:
        return sum(t.n_elements for t in self.trainable)

    @property
    def codes_by_type(self) -> dict[str, int]:
        """The trainable codes per quant type name (Q4_1, Q8_0, ...)."""
        codes: dict[str, int] = {}
        for t in self.trainable:
            codes[t.type_name] = codes.get(t.type_name, 0) + t.n_elements
        return codes

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def has_chat_template(self) -> bool:
        """True when the model says how to render chat turns (``tokenizer.chat_template``), as llama.cpp reads it."""
        return bool(self.metadata.get("tokenizer.chat_template"))

    def sha256(self) -> str:
        """sha256 of the whole file, read once on first use."""
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256


def open_model(path: os.PathLike | str, train_embeddings: bool = False) -> ModelFile:
    """Open and validate a GGUF read-only; list its tensors and which QES trains.

    Trainable: 2-D tensors whose quant type has a code layout in ``formats``.
    ``token_embd.weight`` only with ``train_embeddings``; ``output.weight`` is
    an ordinary matrix.  Finding nothing trainable is not an error here.

    ``header_sha256`` is a sha256 over the file size and every byte before the
    tensor data (magic, version, all metadata, the tensor table, padding).  It
    ignores tensor data, so a working copy keeps its source's header_sha256
    while training edits it; ``sha256()`` and :func:`weights_sha256` cover the
    weights.
    """
    path = Path(path)
    header = scan(path)
    return ModelFile(
        path=path,
        version=header.version,
        alignment=header.alignment,
        data_offset=header.data_offset,
        file_size=header.file_size,
        tensors=[_tensor_info(t, header.data_offset, train_embeddings) for t in header.tensors],
        metadata={r.key: r.value for r in header.records if r.value is not None},
        header_sha256=header.header_sha256,
    )


def tensor_views(
    working_copy: os.PathLike | str, tensors: Iterable[TensorInfo]
) -> tuple[np.memmap, list[np.ndarray]]:
    """Map the working copy read-write; one uint8 view per tensor into that map.

    Writes through the views land in the page cache llama.cpp reads from.  The
    map stays open as long as the memmap or any view is referenced.
    """
    working_copy = Path(working_copy)
    try:
        live = np.memmap(working_copy, dtype=np.uint8, mode="r+")
    except (OSError, ValueError) as e:
        raise QesError(f"cannot map {working_copy} read-write: {describe(e)}") from None
    views = []
    for t in tensors:
        if t.offset + t.n_bytes > live.size:
            raise QesError(f"{working_copy}: tensor '{shown(t.name)}' ends past the end of the file; wrong working copy?")
        views.append(live[t.offset : t.offset + t.n_bytes])
    return live, views


def weights_sha256(model: ModelFile, buf=None) -> str:
    """sha256 of the tensor data section: the weights, whatever the metadata says.

    ``buf``: a mapping of the file (e.g. a working copy's memmap) to hash instead of reading it.
    """
    if buf is not None:
        return hashlib.sha256(memoryview(buf)[model.data_offset:]).hexdigest()
    return file_sha256(model.path, start=model.data_offset)


def _tensor_info(t: TableEntry, data_offset: int, train_embeddings: bool) -> TensorInfo:
    reason = _frozen_reason(t.name, t.ggml_type, t.shape, train_embeddings)
    return TensorInfo(
        name=t.name,
        ggml_type=int(t.ggml_type),
        type_name=t.ggml_type.name,
        shape=t.shape,
        n_elements=t.n_elements,
        offset=data_offset + t.relative_offset,
        n_bytes=t.n_bytes,
        trainable=not reason,
        reason=reason,
    )


def _frozen_reason(name: str, ggml_type: GGMLQuantizationType, shape: tuple[int, ...], train_embeddings: bool) -> str:
    """Why QES leaves a tensor alone, or "" when it trains it."""
    n_dims = len(shape)
    while n_dims > 1 and shape[n_dims - 1] == 1:  # [n, 1] is a vector stored as a matrix
        n_dims -= 1
    if n_dims != 2:
        return f"{ggml_type.name} norm" if "norm" in name else f"{n_dims}-D tensor"
    if format_of(ggml_type) is None:
        return f"unsupported type {ggml_type.name}"
    if name == "token_embd.weight" and not train_embeddings:
        return "token embedding (use --train-embeddings)"
    return ""
