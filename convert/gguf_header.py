"""Read a GGUF file's header — metadata and tensor table — without touching tensor data.

gguf-py's ``GGUFReader`` builds a numpy view for every element of every array, which takes
~1.5 s on a 50k-token vocabulary. Here long arrays are skipped (their length is kept), so a
base model's header reads in milliseconds. The format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf import GGMLQuantizationType, GGUFValueType

_SCALAR = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
MAX_ARRAY_KEPT = 64  # longer arrays (vocabularies, merges) are skipped; their length is kept


class GGUFHeaderError(ValueError):
    pass


@dataclass
class TensorEntry:
    name: str
    ne: tuple[int, ...]  # GGUF order: ne[0] is the fastest-moving dimension
    type: GGMLQuantizationType
    offset: int  # relative to the start of the data section


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, object]
    array_lengths: dict[str, int]  # every array key -> its length, kept or not
    tensors: dict[str, TensorEntry]
    data_offset: int
    types: dict[str, GGUFValueType] | None = None  # every key -> its GGUF value type (ARRAY for arrays)
    size: int = 0  # the file's size in bytes

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")  # type: ignore[return-value]

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)


class _Cursor:
    def __init__(self, buf: bytes | memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        size = struct.calcsize("<" + fmt)
        if self.pos + size > len(self.buf):
            raise GGUFHeaderError(f"{self.path}: the GGUF header is truncated")
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise GGUFHeaderError(f"{self.path}: the GGUF header is truncated")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def skip_string(self) -> None:
        n = self.unpack("Q")  # read first: `self.pos += self.unpack(...)` would lose the 8 bytes
        self.pos += n

    def value(self, vtype: int, keep: bool = True):
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        raise GGUFHeaderError(f"{self.path}: unknown GGUF value type {vtype}")


def read_header(path: str | Path) -> GGUFHeader:
    path = Path(path)
    try:
        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            view = memoryview(buf)
            try:
                return _parse(view, path, len(buf))
            finally:
                view.release()
    except (OSError, ValueError) as exc:
        if isinstance(exc, GGUFHeaderError):
            raise
        raise GGUFHeaderError(f"{path}: cannot read it as GGUF ({exc})") from None


def _parse(buf: memoryview, path: Path, size: int) -> GGUFHeader:
    cur = _Cursor(buf, path)
    if size < 24 or bytes(buf[:4]) != b"GGUF":
        raise GGUFHeaderError(f"{path} is not a GGUF file (bad magic)")
    cur.pos = 4
    version = cur.unpack("I")
    if version not in (2, 3):
        raise GGUFHeaderError(f"{path}: GGUF version {version} is not supported (big-endian or too old?)")
    n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
    metadata: dict[str, object] = {}
    lengths: dict[str, int] = {}
    types: dict[str, GGUFValueType] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.unpack("I")
        try:
            types[key] = GGUFValueType(vtype)
        except ValueError:
            raise GGUFHeaderError(f"{path}: key {key} has unknown value type {vtype}") from None
        if vtype == GGUFValueType.ARRAY:
            etype, count = cur.unpack("I"), cur.unpack("Q")
            lengths[key] = count
            if count <= MAX_ARRAY_KEPT:
                metadata[key] = [cur.value(etype) for _ in range(count)]
            elif etype == GGUFValueType.STRING:
                for _ in range(count):
                    cur.skip_string()
            elif etype in _SCALAR:
                cur.pos += count * struct.calcsize("<" + _SCALAR[etype])
            else:
                raise GGUFHeaderError(f"{path}: nested arrays in {key} are not supported")
        else:
            metadata[key] = cur.value(vtype)
    tensors: dict[str, TensorEntry] = {}
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("I")
        ne = tuple(cur.unpack("Q") for _ in range(n_dims))
        ttype, offset = cur.unpack("I"), cur.unpack("Q")
        try:
            qtype = GGMLQuantizationType(ttype)
        except ValueError:
            raise GGUFHeaderError(f"{path}: tensor {name} has unknown type {ttype}") from None
        tensors[name] = TensorEntry(name, ne, qtype, offset)
    align = int(metadata.get("general.alignment", 32))  # type: ignore[arg-type]
    data_offset = (cur.pos + align - 1) // align * align
    return GGUFHeader(path, version, metadata, lengths, tensors, data_offset, types, size)
