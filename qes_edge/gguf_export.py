"""Export: the working copy spliced with ``qes.*`` provenance records into a new GGUF.

Export splices the file instead of re-encoding it with ``gguf.GGUFWriter``:
metadata records and the tensor table are copied byte for byte (the
reader/writer round trip flattens nested arrays and cannot write empty ones),
the new ``qes.*`` records are appended, and the tensor data is streamed.  The
tests check the result against gguf-py as an independent oracle.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import BinaryIO, Iterable, Union

from gguf import GGUFValueType

from .errors import QesError
from .faults import crash_point
from .files import COPY_CHUNK, atomic_output, same_file
from .gguf_header import PREAMBLE, Header, pad, scan

PROVENANCE_PREFIX = "qes."

Provenance = dict[str, Union[str, int, float]]


def export_model(
    working_copy: os.PathLike | str,
    out: os.PathLike | str,
    provenance: Provenance,
    protect: Iterable[os.PathLike | str] = (),
) -> None:
    """Write the working copy plus ``qes.*`` provenance metadata to ``out``.

    Tensor names, types, shapes, bytes, alignment and every metadata record are
    kept exactly; each provenance key is added under ``qes.`` (replacing an
    older value of the same key).  The file appears at ``out`` complete or not
    at all.  ``out`` may not be the working copy or any ``protect`` path (the
    user's source model).
    """
    working_copy, out = Path(working_copy), Path(out)
    for keep in (working_copy, *map(Path, protect)):
        if same_file(out, keep):
            raise QesError(f"refusing to export over {keep}: choose another output path")
    if out.is_dir():
        raise QesError(f"cannot export to {out}: it is a directory")
    added = {_provenance_key(k): _metadata_record(_provenance_key(k), v) for k, v in provenance.items()}
    header = scan(working_copy)
    with atomic_output(out, f"cannot write {out}") as tmp:
        with open(working_copy, "rb") as src, open(tmp, "wb") as dst:
            _write_spliced(src, dst, header, added)
            dst.flush()
            os.fsync(dst.fileno())
        _check_export(tmp, header, added)
        crash_point("export")


def _provenance_key(key: str) -> str:
    return key if key.startswith(PROVENANCE_PREFIX) else PROVENANCE_PREFIX + key


def _metadata_record(key: str, value: str | int | float) -> bytes:
    """One encoded metadata record: bool, int64 (uint64 when too big), float64 or string."""
    if isinstance(value, bool):
        body = struct.pack("<I?", GGUFValueType.BOOL, value)
    elif isinstance(value, int) and -(1 << 63) <= value < (1 << 63):
        body = struct.pack("<Iq", GGUFValueType.INT64, value)
    elif isinstance(value, int) and 0 <= value < (1 << 64):
        body = struct.pack("<IQ", GGUFValueType.UINT64, value)
    elif isinstance(value, float):
        body = struct.pack("<Id", GGUFValueType.FLOAT64, value)
    elif isinstance(value, str):
        body = struct.pack("<I", GGUFValueType.STRING) + _encode_string(value)
    else:
        raise TypeError(f"provenance {key!r}: {value!r} is not a str, a 64-bit int or a float")
    return _encode_string(key) + body


def _encode_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _write_spliced(src: BinaryIO, dst: BinaryIO, header: Header, added: dict[str, bytes]) -> None:
    """The source file with its metadata section extended; everything else copied verbatim."""
    kept = [r for r in header.records if r.key not in added]
    dst.write(PREAMBLE.pack(b"GGUF", header.version, len(header.tensors), len(kept) + len(added)))
    for r in kept:
        _copy_range(src, dst, r.start, r.end)
    for record in added.values():
        dst.write(record)
    _copy_range(src, dst, header.table_start, header.table_end)
    dst.write(bytes(pad(dst.tell(), header.alignment) - dst.tell()))
    _copy_range(src, dst, header.data_offset, header.file_size)


def _copy_range(src: BinaryIO, dst: BinaryIO, start: int, end: int) -> None:
    src.seek(start)
    remaining = end - start
    while remaining:
        chunk = src.read(min(remaining, COPY_CHUNK))
        if not chunk:
            raise OSError(f"the working copy shrank while it was being exported (missing {remaining:,} bytes)")
        dst.write(chunk)
        remaining -= len(chunk)


def _check_export(path: Path, source: Header, added: dict[str, bytes]) -> None:
    """Re-read what was written: the same tensor table and every metadata key."""
    written = scan(path)
    keys = {r.key for r in source.records} | set(added)
    if written.tensors != source.tensors or {r.key for r in written.records} != keys:
        raise QesError(f"export check failed: {path} does not match the working copy")
