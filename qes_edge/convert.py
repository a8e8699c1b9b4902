"""The same model in another GGML type, made with gguf-py (the tests' quant types, the F16 baseline).

Every 2-D Q4_1 tensor goes through ``gguf.quants.dequantize`` and then
``gguf.quants.quantize`` (or a plain cast for F16/F32); all other tensors and
all metadata are copied, ``general.file_type`` updated.  Meant for the default
model (Q4_1), whose matrices are what QES trains.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

# Types the default Q4_1 model can be converted to in numpy.
TARGETS = ("F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def convert_matrices(reader: GGUFReader | os.PathLike | str, dest: os.PathLike | str, target: str | None,
                     drop: tuple[str, ...] = ()) -> Path:
    """Write ``dest``: the model with its 2-D Q4_1 matrices stored as ``target`` (None: every tensor as it
    is) and without the metadata keys in ``drop`` (e.g. ``tokenizer.chat_template``: a base model's file)."""
    if target is not None and target not in TARGETS:
        raise ValueError(f"cannot convert to {target}; choose one of {TARGETS}")
    if not isinstance(reader, GGUFReader):
        reader = GGUFReader(reader, "r")
    kind = GGMLQuantizationType[target] if target is not None else None
    dest = Path(dest)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    tmp = dest.with_name(dest.name + ".tmp")
    writer = GGUFWriter(tmp, arch=arch)
    writer.data_alignment = int(reader.alignment)
    copy_metadata(reader, writer, drop, int(gguf.LlamaFileType[f"MOSTLY_{target}"]) if target is not None else None)
    for tensor in reader.tensors:
        if kind is not None and tensor.tensor_type == GGMLQuantizationType.Q4_1 and len(tensor.shape) == 2:
            weights = gguf.quants.dequantize(tensor.data, GGMLQuantizationType.Q4_1)
            data = weights.astype(np.float16) if kind == GGMLQuantizationType.F16 else \
                gguf.quants.quantize(weights, kind)
            writer.add_tensor(tensor.name, data, raw_dtype=kind)
        else:
            writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    write_and_close(writer)
    tmp.replace(dest)
    return dest


def copy_metadata(reader: GGUFReader, writer: GGUFWriter, drop: tuple[str, ...] = (),
                  file_type: int | None = None) -> None:
    """Every metadata field of ``reader`` into ``writer``, but those in ``drop``; ``file_type``: a new
    general.file_type."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == gguf.Keys.General.ARCHITECTURE or field.name in drop:
            continue  # virtual fields, the one the writer adds itself, and those asked to go
        value = field.contents()
        if field.name == gguf.Keys.General.FILE_TYPE and file_type is not None:
            value = file_type
        sub_type = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)


def write_and_close(writer: GGUFWriter) -> None:
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
