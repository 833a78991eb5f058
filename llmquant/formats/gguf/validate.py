"""Check a GGUF file's header before anything trusts it.

A GGUF header is counts and lengths that a reader would otherwise allocate or loop by. `check_gguf`
streams through it with plain reads, compares every count and length with the bytes left in the file
before using it, and checks each tensor's type, shape and data range, so a truncated or corrupt file
fails with one UserError line naming the file, not a struct.error, a MemoryError or a llama.cpp crash.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from llmquant.errors import UserError

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # version 1 had 32-bit counts
HEADER = struct.Struct("<4sIQQ")  # magic, version, n_tensors, n_kv
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 2**62
MAX_NESTING = 8  # arrays of arrays; a deeper chain would only exhaust Python's recursion
SHOWN_ITEMS = 64  # longer arrays are summarized, e.g. "array[str] of 49152"
ALIGNMENT_KEY = "general.alignment"
DEFAULT_ALIGNMENT = 32

_SCALARS = {t: struct.Struct(fmt) for t, fmt in {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}.items()}
# The fewest bytes a value of each type takes: a string is at least its length, an array its item type and count.
_MIN_SIZE = {**{t: s.size for t, s in _SCALARS.items()}, GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
MIN_KV = 8 + 4 + 1  # key length, value type, a one-byte value
MIN_TENSOR_INFO = 8 + 4 + 4 + 8  # name length, n_dims, ggml type, offset


class TensorInfo(NamedTuple):
    name: str
    type: str  # ggml type name, e.g. "Q8_0"
    shape: tuple[int, ...]  # GGUF order: ne[0] (the row length) first
    offset: int  # from the start of the data section, as stored
    nbytes: int


@dataclass
class GGUFSummary:
    version: int
    metadata: dict[str, Any]
    tensors: list[TensorInfo]
    data_offset: int  # where the data section starts in the file
    file_size: int


class _Reader:
    """Reads a file front to back, refusing any read that would go past its end."""

    def __init__(self, f: BinaryIO, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    @property
    def left(self) -> int:
        return self.size - self.f.tell()

    def fail(self, what: str) -> UserError:
        return UserError(f"{self.path}: {what}")

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise self.fail(f"truncated: {what} needs {n} bytes at offset {self.f.tell()}, only {self.left} left")
        return self.f.read(n)

    def scalar(self, vtype: int, what: str) -> Any:
        s = _SCALARS[vtype]
        return s.unpack(self.take(s.size, what))[0]

    def string(self, what: str) -> str:
        try:
            return self.take(self.scalar(GGUFValueType.UINT64, what), what).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(vtype, what)
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what, depth)
        raise self.fail(f"{what} has unknown value type {vtype}")

    def array(self, what: str, depth: int) -> Any:
        """The items, or for a long array a description, after reading past all of them."""
        if depth == MAX_NESTING:
            raise self.fail(f"{what} nests arrays deeper than {MAX_NESTING}")
        item, count = self.scalar(GGUFValueType.UINT32, what), self.scalar(GGUFValueType.UINT64, what)
        if item not in _MIN_SIZE:
            raise self.fail(f"{what} has unknown array item type {item}")
        if count * _MIN_SIZE[item] > self.left:
            raise self.fail(f"{what} is an array of {count} items that cannot fit in the {self.left} bytes left")
        if count <= SHOWN_ITEMS:
            return [self.value(item, what, depth + 1) for _ in range(count)]
        if item in _SCALARS:
            self.f.seek(count * _MIN_SIZE[item], os.SEEK_CUR)  # fits: checked above
        else:
            for _ in range(count):
                self.value(item, what, depth + 1)
        name = "str" if item == GGUFValueType.STRING else GGUFValueType(item).name.lower()
        return f"array[{name}] of {count}"

    def metadata(self, n_kv: int) -> dict[str, Any]:
        metadata = {}
        for i in range(n_kv):
            key = self.string(f"key {i}")
            vtype = self.scalar(GGUFValueType.UINT32, f"type of {key!r}")
            if key in metadata:
                raise self.fail(f"duplicate key {key!r}")
            if key == ALIGNMENT_KEY and vtype != GGUFValueType.UINT32:
                raise self.fail(f"{ALIGNMENT_KEY} has value type {vtype}, expected uint32")
            metadata[key] = self.value(vtype, f"value of {key!r}")
        return metadata

    def tensor_info(self, i: int) -> TensorInfo:
        name = self.string(f"name of tensor {i}")
        n_dims = self.scalar(GGUFValueType.UINT32, f"n_dims of {name!r}")
        if n_dims > MAX_DIMS:
            raise self.fail(f"tensor {name!r} has {n_dims} dims, at most {MAX_DIMS} allowed")
        shape = tuple(self.scalar(GGUFValueType.INT64, f"dims of {name!r}") for _ in range(n_dims))
        type_id = self.scalar(GGUFValueType.UINT32, f"type of {name!r}")
        offset = self.scalar(GGUFValueType.UINT64, f"offset of {name!r}")
        if any(d <= 0 for d in shape):
            raise self.fail(f"tensor {name!r} has shape {list(shape)}; every dim must be positive")
        if math.prod(shape) > MAX_ELEMENTS:
            raise self.fail(f"tensor {name!r} has shape {list(shape)}: more than 2**62 elements")
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise self.fail(f"tensor {name!r} has unknown ggml type {type_id}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        row = shape[0] if shape else 1
        if row % block:
            raise self.fail(f"tensor {name!r} of type {qtype.name} has rows of {row}, "
                            f"not a multiple of its block size {block}")
        return TensorInfo(name, qtype.name, shape, offset, math.prod(shape) // block * type_size)


def _check_placement(r: _Reader, tensors: list[TensorInfo], data_offset: int, alignment: int) -> None:
    """Every tensor's data starts aligned, ends inside the file and overlaps no other's."""
    previous = None
    for t in sorted(tensors, key=lambda t: (t.offset, t.nbytes)):
        if t.offset % alignment:
            raise r.fail(f"tensor {t.name!r} has offset {t.offset}, not a multiple of the alignment {alignment}")
        end = data_offset + t.offset + t.nbytes
        if end > r.size:
            raise r.fail(f"tensor {t.name!r} ends at byte {end}, past the end of the file ({r.size} bytes)")
        if previous is not None and t.offset < previous.offset + previous.nbytes:
            raise r.fail(f"tensors {previous.name!r} and {t.name!r} overlap")
        previous = t


def check_gguf(path: str | os.PathLike) -> GGUFSummary:
    """Read and check a GGUF file's header and tensor table (not the tensor data); UserError if malformed."""
    path = Path(path)
    try:
        f = path.open("rb")
    except OSError as e:
        raise UserError(f"{path}: cannot open: {e.strerror}") from None
    with f:
        r = _Reader(f, path, os.fstat(f.fileno()).st_size)
        if r.size < HEADER.size:
            raise r.fail(f"file of {r.size} bytes is shorter than the {HEADER.size}-byte GGUF header")
        magic, version, n_tensors, n_kv = HEADER.unpack(r.take(HEADER.size, "header"))
        if magic != MAGIC:
            raise r.fail(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
        if version not in VERSIONS:
            raise r.fail(f"unsupported GGUF version {version} (supported: {', '.join(map(str, VERSIONS))})")
        if n_kv * MIN_KV > r.left:
            raise r.fail(f"key/value count {n_kv} cannot fit in the {r.left} bytes after the header")
        if n_tensors * MIN_TENSOR_INFO > r.left:
            raise r.fail(f"tensor count {n_tensors} cannot fit in the {r.left} bytes after the header")
        metadata = r.metadata(n_kv)
        alignment = metadata.get(ALIGNMENT_KEY, DEFAULT_ALIGNMENT)
        if alignment <= 0 or alignment & (alignment - 1):
            raise r.fail(f"{ALIGNMENT_KEY} is {alignment}, not a positive power of two")
        tensors: dict[str, TensorInfo] = {}
        for i in range(n_tensors):
            t = r.tensor_info(i)
            if t.name in tensors:
                raise r.fail(f"duplicate tensor name {t.name!r}")
            tensors[t.name] = t
        data_offset = -(-f.tell() // alignment) * alignment
    infos = list(tensors.values())
    _check_placement(r, infos, data_offset, alignment)
    return GGUFSummary(version, metadata, infos, data_offset, r.size)


def array_length(value) -> int | None:
    """The length of an array value as check_gguf keeps it: a list, or past SHOWN_ITEMS its summary."""
    if isinstance(value, list):
        return len(value)
    if isinstance(value, str) and value.startswith("array[") and " of " in value:
        return int(value.rsplit(" of ", 1)[1])
    return None
