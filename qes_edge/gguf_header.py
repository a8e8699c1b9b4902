"""The GGUF header, read by a small scanner rather than ``gguf.GGUFReader``.

The reader builds a numpy view per metadata item, which takes 6 s for
SmolLM2's 49k-token vocabulary (this scan: well under a second), clips reads at
end of file instead of reporting truncation, and can spin on a corrupted array
length.  The tests check the scan against gguf-py as an independent oracle.

Layout (little-endian; see ``docs/gguf.md`` in ggml): magic "GGUF", u32
version, u64 tensor count, u64 metadata count, the metadata records, the
tensor table (name, u32 n_dims, u64 dims, u32 type, u64 offset relative to the
data section), zero padding to the alignment, then the tensor data, each
tensor aligned and packed in table order.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from .errors import QesError
from .files import describe

SUPPORTED_VERSIONS = (2, 3)  # identical layouts for little-endian files
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32

PREAMBLE = struct.Struct("<4sIQQ")  # magic, version, tensor count, metadata count
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}


def shown(name: str, limit: int = 64) -> str:
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
class Record:
    """One metadata key/value record and where its bytes lie."""

    key: str
    value_type: GGUFValueType
    value: object  # scalars and strings; None for arrays
    start: int
    end: int


@dataclass(frozen=True)
class TableEntry:
    name: str
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]
    relative_offset: int  # from the start of the data section
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class Header:
    version: int
    alignment: int
    records: list[Record]
    table_start: int
    table_end: int
    data_offset: int
    tensors: list[TableEntry]
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


def scan(path: Path) -> Header:
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
            head = f.read(PREAMBLE.size)
    except FileNotFoundError:
        raise QesError(f"model file not found: {path}") from None
    except OSError as e:
        raise QesError(f"cannot read {path}: {describe(e)}") from None
    if head[:4] != b"GGUF":
        found = f"starts with {head[:4]!r}, expected b'GGUF'" if head else "it is empty"
        raise QesError(f"{path}: not a GGUF file ({found})")
    if len(head) < PREAMBLE.size:
        raise QesError(f"{path}: truncated: {size} bytes is too short for a GGUF header")
    version = PREAMBLE.unpack(head)[1]
    if version and version & 0xFFFF == 0:
        raise QesError(f"{path}: big-endian GGUF; llama.cpp on this machine needs a little-endian file")
    if version not in SUPPORTED_VERSIONS:
        raise QesError(f"{path}: unsupported GGUF version {version} (this tool reads versions 2 and 3)")
    return size


def _parse_header(buf, size: int) -> Header:
    _, version, n_tensors, n_records = PREAMBLE.unpack_from(buf)
    if n_tensors > size or n_records > size:
        raise _Corrupt(f"the header claims {n_tensors:,} tensors and {n_records:,} metadata records")
    cursor = _Cursor(buf, PREAMBLE.size)
    records = [_read_record(cursor) for _ in range(n_records)]
    alignment = _alignment(records)
    table_start = cursor.pos
    tensors = [_read_table_entry(cursor) for _ in range(n_tensors)]
    table_end = cursor.pos
    data_offset = pad(table_end, alignment)
    _check_tensor_layout(tensors, alignment, data_offset, size)
    header_sha256 = hashlib.sha256(size.to_bytes(8, "little"))
    header_sha256.update(buf[: min(data_offset, size)])
    return Header(version, alignment, records, table_start, table_end, data_offset, tensors, size,
                   header_sha256.hexdigest())


def _read_record(cursor: _Cursor) -> Record:
    start = cursor.pos
    key = cursor.string()
    value_type = cursor.scalar("<I")
    try:
        value_type = GGUFValueType(value_type)
    except ValueError:
        raise _Corrupt(f"metadata '{shown(key)}' has unknown value type {value_type}") from None
    value = cursor.value(value_type)
    return Record(key, value_type, value, start, cursor.pos)


def _alignment(records: list[Record]) -> int:
    keys = [r.key for r in records]
    if len(set(keys)) != len(keys):
        raise _Corrupt("duplicate metadata keys")
    for r in records:
        if r.key == "general.alignment":
            if r.value_type != GGUFValueType.UINT32 or r.value <= 0 or r.value & (r.value - 1):
                raise _Corrupt(f"general.alignment must be a power of two, got {r.value!r}")
            return r.value
    return DEFAULT_ALIGNMENT


def _read_table_entry(cursor: _Cursor) -> TableEntry:
    name = cursor.string()
    n_dims = cursor.scalar("<I")
    if not 1 <= n_dims <= MAX_DIMS:
        raise _Corrupt(f"tensor '{shown(name)}' has {n_dims} dimensions")
    shape = tuple(cursor.scalar("<Q") for _ in range(n_dims))
    raw_type = cursor.scalar("<I")
    relative_offset = cursor.scalar("<Q")
    try:
        ggml_type = GGMLQuantizationType(raw_type)
        block_elems, block_bytes = GGML_QUANT_SIZES[ggml_type]
    except (ValueError, KeyError):
        raise _Corrupt(f"tensor '{shown(name)}' has unknown type {raw_type}") from None
    if shape[0] % block_elems:
        raise _Corrupt(f"tensor '{shown(name)}': rows of {shape[0]} are not whole {ggml_type.name} blocks")
    n_elements = math.prod(shape)
    return TableEntry(name, ggml_type, shape, relative_offset, n_elements, n_elements // block_elems * block_bytes)


def _check_tensor_layout(tensors: list[TableEntry], alignment: int, data_offset: int, size: int) -> None:
    """What llama.cpp insists on: tensors packed in table order, each aligned, inside the file."""
    names = set()
    expected = 0
    for t in tensors:
        if t.name in names:
            raise _Corrupt(f"tensor '{shown(t.name)}' appears twice")
        names.add(t.name)
        if t.relative_offset != expected:
            raise _Corrupt(f"tensor '{shown(t.name)}' at data offset {t.relative_offset:,}, expected {expected:,}")
        if data_offset + t.relative_offset + t.n_bytes > size:
            raise _PastEnd(data_offset + t.relative_offset + t.n_bytes, f"tensor '{shown(t.name)}'")
        expected += pad(t.n_bytes, alignment)
    if tensors and size > data_offset + expected:
        raise _Corrupt(f"{size - data_offset - expected:,} bytes after the last tensor (tensor count or table damaged)")


def pad(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment
