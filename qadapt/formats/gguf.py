"""GGUF files: metadata and memory-mapped tensors, validated before anything uses them.

The header is read straight from a memory map, every count and length checked
against the file's size; tensors are read-only views of the mapped file (nothing
is copied), laid out as gguf-py lays them out (element types as arrays of their
dtype, block types as ``[rows, bytes per row]``). Every failure is a
:class:`FormatError` naming the file and the key or tensor.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import FormatError, InputError, UnsupportedError
from ..quant.types import GGML_TYPE_NAMES

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: str  # gguf type name, e.g. "Q4_K"
    shape: tuple[int, ...]  # torch order: [rows, cols] for a matrix (gguf stores it reversed)
    data: np.ndarray  # memory-mapped; [rows, bytes_per_row] uint8 for block types
    nbytes: int


#: GGUF metadata value types: id -> (struct format, numpy dtype) for scalars; 8 = string, 9 = array
_SCALARS = {0: ("B", "u1"), 1: ("b", "i1"), 2: ("H", "u2"), 3: ("h", "i2"), 4: ("I", "u4"), 5: ("i", "i4"),
            6: ("f", "f4"), 7: ("?", "?"), 10: ("Q", "u8"), 11: ("q", "i8"), 12: ("d", "f8")}
_SCALAR_SIZE = {k: np.dtype(v[1]).itemsize for k, v in _SCALARS.items()}
#: arrays of arrays deeper than this are refused (real files use one level)
_MAX_NESTING = 8
#: numpy item types of the tensor types stored element by element; every other type is read as bytes
_ELEMENT_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
                   "I32": np.int32, "I64": np.int64}


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    dims: tuple[int, ...]  # GGUF order (fastest-varying first)
    type_id: int
    offset: int  # from the start of the data section


@dataclass(frozen=True)
class GGUFHeader:
    metadata: dict[str, Any]
    infos: list[_TensorInfo]
    data_start: int
    kv_spans: dict[str, tuple[int, int]]  # key -> byte span of its whole entry (key, type, value)
    infos_span: tuple[int, int]  # byte span of the tensor infos
    alignment: int


def read_header(path: Path, mm, size: int) -> GGUFHeader:
    """The metadata, the tensor infos and the data section's offset, read straight from the mapping.

    Every count and length is checked against the file's size before it is used (a 2^60-element array
    in a 2 KB file is refused, not looped over), arrays nest at most _MAX_NESTING deep, and string arrays
    (a vocabulary of 128k tokens and 280k merges) decode in one pass (~0.3 s; gguf-py's reader builds a
    numpy view per item and took 7 s for Llama 3's vocabulary)."""
    import struct

    if size < 24:
        raise FormatError(f"{path}: truncated GGUF header ({size} bytes, the fixed part alone is 24)")
    (version,) = struct.unpack_from("<I", mm, 4)
    if version not in (2, 3):
        if struct.unpack_from(">I", mm, 4)[0] in (2, 3):
            raise UnsupportedError(f"{path}: a big-endian GGUF file; qadapt reads little-endian files (as "
                                   "llama.cpp writes them on every common machine)")
        raise UnsupportedError(f"{path}: GGUF version {version}; qadapt reads versions 2 and 3")
    where = "header"

    def need(off: int, n: int, what: str) -> None:
        if n < 0 or off + n > size:
            raise FormatError(f"{path}: {where}: {what} needs {n} bytes at offset {off}, past the end of the "
                              f"file ({size} bytes)")

    def u(off: int, fmt: str, what: str) -> int:
        need(off, struct.calcsize(fmt), what)
        return struct.unpack_from("<" + fmt, mm, off)[0]

    def text(start: int, end: int) -> str:
        return bytes(mm[start:end]).decode("utf-8", "replace")

    def string(off: int, what: str) -> tuple[str, int]:
        n = u(off, "Q", f"the length of {what}")
        need(off + 8, n, f"{what} ({n} bytes)")
        return text(off + 8, off + 8 + n), off + 8 + n

    def value(off: int, vtype: int, what: str, depth: int = 0) -> tuple[Any, int]:
        if vtype in _SCALARS:
            fmt = _SCALARS[vtype][0]
            return u(off, fmt, what), off + _SCALAR_SIZE[vtype]
        if vtype == 8:
            return string(off, what)
        if vtype != 9:
            raise FormatError(f"{path}: {where}: {what} has unknown value type {vtype}")
        if depth >= _MAX_NESTING:
            raise FormatError(f"{path}: {where}: {what} nests arrays more than {_MAX_NESTING} deep")
        itype, count = u(off, "I", f"the item type of {what}"), u(off + 4, "Q", f"the length of {what}")
        off += 12
        if itype in _SCALARS:
            n = count * _SCALAR_SIZE[itype]
            need(off, n, f"an array of {count} items")
            arr = np.frombuffer(mm, dtype=np.dtype(_SCALARS[itype][1]).newbyteorder("<"), count=count, offset=off)
            return arr.tolist(), off + n
        need(off, count * (8 if itype == 8 else 12), f"an array of {count} items")
        if itype == 8:  # strings (a vocabulary): one pass, each length checked before its bytes are read
            length = struct.Struct("<Q").unpack_from
            items = []
            append = items.append
            for i in range(count):
                end = off + 8 + length(mm, off)[0] if off + 8 <= size else size + 1
                if end > size:
                    string(off, f"{what}[{i}]")  # raises, naming the item
                append(str(mm[off + 8:end], "utf-8", "replace"))
                off = end
            return items, off
        items = []
        for i in range(count):
            item, off = value(off, itype, f"{what}[{i}]", depth + 1)
            items.append(item)
        return items, off

    n_tensors, n_kv = u(8, "Q", "the tensor count"), u(16, "Q", "the metadata count")
    off = 24
    need(off, n_kv * 12, f"{n_kv} metadata entries")
    metadata: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    for i in range(n_kv):
        key, key_end = string(off, f"metadata key {i}")
        where = f"metadata `{key}`"
        if key in metadata:
            raise FormatError(f"{path}: metadata key `{key}` appears twice")
        start = off
        metadata[key], off = value(key_end + 4, u(key_end, "I", "the value type"), "the value")
        spans[key] = (start, off)
    where = "tensor infos"
    infos_start = off
    need(off, n_tensors * 24, f"{n_tensors} tensor infos")
    infos = []
    for i in range(n_tensors):
        name, off = string(off, f"tensor {i}'s name")
        n_dims = u(off, "I", f"tensor {i}'s dimension count")
        need(off + 4, n_dims * 8 + 12, f"tensor {i}'s {n_dims} dimensions, type and offset")
        dims = struct.unpack_from(f"<{n_dims}Q", mm, off + 4)
        type_id, t_off = struct.unpack_from("<IQ", mm, off + 4 + n_dims * 8)
        infos.append(_TensorInfo(name, tuple(dims), type_id, t_off))
        off += 4 + n_dims * 8 + 12
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise FormatError(f"{path}: metadata `general.alignment` is {align!r}, expected a power of two")
    return GGUFHeader(metadata, infos, -(-off // align) * align, spans, (infos_start, off), align)


class GGUFFile:
    """A validated, memory-mapped GGUF file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"model file {self.path} does not exist")
        if self.path.is_dir():
            raise InputError(f"{self.path} is a directory, expected a .gguf file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise FormatError(f"{self.path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        import mmap

        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            header = read_header(self.path, mm, size)
        self.metadata, infos, data_start = header.metadata, header.infos, header.data_start
        self.file_size = size
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise FormatError(f"{self.path}: metadata has no `general.architecture` string")
        self.architecture = arch
        # the whole file as bytes, read-only and memory-mapped: tensors are views of it, nothing is copied
        self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.tensors: dict[str, GGUFTensor] = {}
        spans = []
        for info in infos:
            if info.name in self.tensors:
                raise FormatError(f"{self.path}: tensor `{info.name}` appears twice")
            t = self.tensors[info.name] = self._check_tensor(info, data_start)
            spans.append((data_start + info.offset, data_start + info.offset + t.nbytes, info.name))
        spans.sort()
        for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise FormatError(f"{self.path}: tensors `{n0}` and `{n1}` overlap (bytes {s1}..{min(e0, e1)})")

    def _check_tensor(self, info: _TensorInfo, data_start: int) -> GGUFTensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        name = info.name
        try:
            qtype = GGMLQuantizationType(info.type_id).name
        except ValueError:
            raise UnsupportedError(f"{self.path}: tensor `{name}` has unknown type id {info.type_id}") from None
        if qtype not in GGML_TYPE_NAMES:
            raise UnsupportedError(
                f"{self.path}: tensor `{name}` has type {qtype}; qadapt runs {', '.join(GGML_TYPE_NAMES)}"
            )
        ne = list(info.dims)
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
        if ne and ne[0] % block:
            raise FormatError(f"{self.path}: tensor `{name}` rows of {ne[0]} are not whole {qtype} blocks of {block}")
        n_el = int(np.prod(ne, dtype=object)) if ne else 1
        want = n_el // block * type_size
        start = data_start + info.offset
        if start + want > self.file_size:
            raise FormatError(
                f"{self.path}: tensor `{name}` ({qtype}, shape {ne[::-1]}) needs {want} bytes at offset "
                f"{start} but the file has {self.file_size} bytes"
            )
        raw = self._data[start:start + want]
        shape = tuple(ne[::-1])
        if qtype in _ELEMENT_DTYPES:
            data = raw.view(_ELEMENT_DTYPES[qtype]).reshape(shape)
        else:  # [..., rows, bytes per row], as gguf-py lays out block types
            data = raw.reshape(*shape[:-1], shape[-1] // block * type_size) if shape else raw
        return GGUFTensor(name, qtype, shape, data, want)

    def release_pages(self) -> None:
        """Drop this process's resident pages of the whole mapping (once a model is built from it).

        Loading reads every tensor (repacks, checks, copies), and the kernel maps neighbouring pages
        on each fault; a model that keeps reading the file (in-place exact layers, the token table)
        faults its pages back from the page cache on first use. What stays resident is then what
        the model reads, not what its load touched."""
        from ..quant import native

        native.release_pages(self._data)

    # ------------------------------------------------------------------ metadata helpers
    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @cached_property
    def arch_metadata(self) -> dict[str, Any]:
        """Metadata under ``{architecture}.`` with the prefix stripped, plus ``vocab_size``."""
        prefix = self.architecture + "."
        out = {k[len(prefix):]: v for k, v in self.metadata.items() if k.startswith(prefix)}
        if "vocab_size" not in out:
            emb = self.tensors.get("token_embd.weight")
            tokens = self.metadata.get("tokenizer.ggml.tokens")
            if emb is not None:
                out["vocab_size"] = emb.shape[0]
            elif isinstance(tokens, list):
                out["vocab_size"] = len(tokens)
        return out

    def tensor(self, name: str) -> GGUFTensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise FormatError(f"{self.path}: tensor `{name}` is missing") from None

    def type_counts(self) -> dict[str, tuple[int, int]]:
        """qtype -> (tensor count, bytes)."""
        out: dict[str, tuple[int, int]] = {}
        for t in self.tensors.values():
            n, b = out.get(t.qtype, (0, 0))
            out[t.qtype] = (n + 1, b + t.nbytes)
        return out


def is_gguf(path: str | os.PathLike) -> bool:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False
