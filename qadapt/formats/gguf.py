"""GGUF files: metadata and memory-mapped tensors, validated before anything uses them.

gguf-py's reader memory-maps the file and copies nothing; this module adds the
checks a loader needs (every tensor inside the file, a type we run, sizes that
agree with the block geometry) and turns its failures into :class:`FormatError`
naming the file.
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


def _field_value(field) -> Any:
    try:
        return field.contents()
    except Exception:  # pragma: no cover - gguf-py older than contents()
        return None


#: bytes of each GGUF metadata scalar type (value type id -> size); 8 = string, 9 = array
_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
#: arrays of arrays deeper than this are refused (real files use one level; gguf-py recurses per level)
_MAX_NESTING = 8


def _check_layout(path: Path, size: int) -> None:
    """Walk the header's key/value and tensor-info sections without reading them into objects, and refuse
    a count or length that runs past the end of the file. gguf-py reads past the end as empty arrays and
    loops over an array's claimed count element by element: a 2^60-element array in a 2 KB file ran
    until memory ran out (found by tools/fuzz.py). Strings and arrays are walked (a 32k-token vocabulary
    takes ~5 ms); fixed-size arrays are skipped by their size; arrays nest at most _MAX_NESTING deep
    (gguf-py recurses per level)."""
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if size < 24:
            raise FormatError(f"{path}: truncated GGUF header ({size} bytes, the fixed part alone is 24)")
        (version,) = struct.unpack_from("<I", mm, 4)
        if version in (2, 3):
            order = "<"
        elif struct.unpack_from(">I", mm, 4)[0] in (2, 3):
            order = ">"  # a big-endian file
        else:
            return  # an unsupported version: gguf-py's own error names it
        where = "header"

        def need(off: int, n: int, what: str) -> None:
            if n < 0 or off + n > size:
                raise FormatError(f"{path}: {where}: {what} needs {n} bytes at offset {off}, past the end of the "
                                  f"file ({size} bytes)")

        def u(off: int, fmt: str, what: str) -> int:
            need(off, struct.calcsize(fmt), what)
            return struct.unpack_from(order + fmt, mm, off)[0]

        def string(off: int, what: str) -> int:
            n = u(off, "Q", f"the length of {what}")
            need(off + 8, n, f"{what} ({n} bytes)")
            return off + 8 + n

        def value(off: int, vtype: int, what: str, depth: int = 0) -> int:
            if vtype in _SCALAR_SIZE:
                need(off, _SCALAR_SIZE[vtype], what)
                return off + _SCALAR_SIZE[vtype]
            if vtype == 8:
                return string(off, what)
            if vtype != 9:
                raise FormatError(f"{path}: {where}: {what} has unknown value type {vtype}")
            if depth >= _MAX_NESTING:
                raise FormatError(f"{path}: {where}: {what} nests arrays more than {_MAX_NESTING} deep")
            itype, count = u(off, "I", f"the item type of {what}"), u(off + 4, "Q", f"the length of {what}")
            off += 12
            if itype in _SCALAR_SIZE:
                need(off, count * _SCALAR_SIZE[itype], f"an array of {count} items")
                return off + count * _SCALAR_SIZE[itype]
            need(off, count * (8 if itype == 8 else 12), f"an array of {count} items")
            if itype == 8:  # strings (a vocabulary): the walk inlined, ~0.3 us a string
                length = struct.Struct(order + "Q").unpack_from
                for i in range(count):
                    end = off + 8 + length(mm, off)[0] if off + 8 <= size else size + 1
                    if end > size:
                        string(off, f"{what}[{i}]")  # raises, naming the item
                    off = end
                return off
            for i in range(count):
                off = value(off, itype, f"{what}[{i}]", depth + 1)
            return off

        n_tensors, n_kv = u(8, "Q", "the tensor count"), u(16, "Q", "the metadata count")
        off = 24
        need(off, n_kv * 12, f"{n_kv} metadata entries")
        for i in range(n_kv):
            key_end = string(off, f"metadata key {i}")
            where = f"metadata `{bytes(mm[off + 8:key_end]).decode('utf-8', 'replace')}`"
            off = value(key_end + 4, u(key_end, "I", "the value type"), "the value")
        where = "tensor infos"
        need(off, n_tensors * 24, f"{n_tensors} tensor infos")
        for i in range(n_tensors):
            off = string(off, f"tensor {i}'s name")
            n_dims = u(off, "I", f"tensor {i}'s dimension count")
            need(off + 4, n_dims * 8 + 12, f"tensor {i}'s {n_dims} dimensions, type and offset")
            off += 4 + n_dims * 8 + 12


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
        import gguf

        _check_layout(self.path, size)
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, IndexError, KeyError, OverflowError, MemoryError, UnicodeDecodeError) as e:
            raise FormatError(f"{self.path}: truncated or malformed GGUF header ({type(e).__name__}: {e})") from None
        self.file_size = size
        self.metadata: dict[str, Any] = {
            k: _field_value(f) for k, f in self._reader.fields.items() if not k.startswith("GGUF.")
        }
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            raise FormatError(f"{self.path}: metadata has no `general.architecture` string")
        self.architecture = arch
        self.tensors: dict[str, GGUFTensor] = {}
        spans = []
        for t in self._reader.tensors:
            if t.name in self.tensors:
                raise FormatError(f"{self.path}: tensor `{t.name}` appears twice")
            self.tensors[t.name] = self._check_tensor(t)
            spans.append((int(t.data_offset), int(t.data_offset) + self.tensors[t.name].nbytes, t.name))
        spans.sort()
        for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise FormatError(f"{self.path}: tensors `{n0}` and `{n1}` overlap (bytes {s1}..{min(e0, e1)})")
        # the reader's fields (a few numpy views per token of the vocabulary: ~70 MB for 32k tokens) are in
        # self.metadata now; dropped before the model is built, they do not add to the load's peak
        self._reader.fields.clear()

    def _check_tensor(self, t) -> GGUFTensor:
        from gguf import GGML_QUANT_SIZES

        name, qtype = t.name, t.tensor_type.name
        if qtype not in GGML_TYPE_NAMES:
            raise UnsupportedError(
                f"{self.path}: tensor `{name}` has type {qtype}; qadapt runs {', '.join(GGML_TYPE_NAMES)}"
            )
        ne = [int(x) for x in t.shape]
        block, type_size = GGML_QUANT_SIZES[t.tensor_type]
        if ne and ne[0] % block:
            raise FormatError(f"{self.path}: tensor `{name}` rows of {ne[0]} are not whole {qtype} blocks of {block}")
        n_el = int(np.prod(ne)) if ne else 1
        want = n_el // block * type_size
        start = int(t.data_offset)
        if start + want > self.file_size or int(t.n_bytes) != want:
            raise FormatError(
                f"{self.path}: tensor `{name}` ({qtype}, shape {ne[::-1]}) needs {want} bytes at offset "
                f"{start} but the file has {self.file_size} bytes"
            )
        if t.data.size * t.data.itemsize != want:
            raise FormatError(f"{self.path}: tensor `{name}` data is truncated")
        return GGUFTensor(name, qtype, tuple(ne[::-1]), t.data, want)

    def release_pages(self) -> None:
        """Drop this process's resident pages of the whole mapping (once a model is built from it).

        Loading reads every tensor (repacks, checks, copies), and the kernel maps neighbouring pages
        on each fault; a model that keeps reading the file (in-place exact layers, the token table)
        faults its pages back from the page cache on first use. What stays resident is then what
        the model reads, not what its load touched."""
        from ..quant import native

        native.release_pages(self._reader.data)

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
