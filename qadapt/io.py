"""The one place that writes files atomically and reads JSON and safetensors headers.

Every file qadapt writes goes through :func:`atomic_write` (temp file in the
same folder, fsync, rename), so an interrupted write never leaves a half file
and an existing file is only replaced when the caller says ``force``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import FormatError, InputError

#: safetensors dtype name -> bytes per element
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


def _temp_next_to(path: Path, suffix: str, folder: bool = False) -> Path:
    """A new empty file (or folder) beside ``path``, with the permissions the umask gives new files.

    Not ``tempfile.mkstemp``/``mkdtemp``: their 0600/0700 would survive the rename, leaving outputs
    (models, caches, package data) unreadable to anyone else.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


@contextmanager
def atomic_path(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp path next to ``path`` for a writer that opens files itself; renamed on success."""
    path = Path(path)
    if path.exists() and not force:
        raise InputError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_next_to(path, ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, force: bool = False) -> Iterator[Any]:
    """Open a temp file next to ``path``; on success it is fsynced and renamed over ``path``.

    Refuses to replace an existing file unless ``force``.
    """
    with atomic_path(path, force=force) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def atomic_dir(path: str | os.PathLike, *, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder next to ``path`` for a writer that fills a whole folder (``save_pretrained``);
    on success it replaces ``path``, so a reader sees the old folder or the complete new one.

    Refuses to replace an existing ``path`` unless ``force``. The swap is two renames (old folder
    aside, new one in): a crash between them leaves the old folder under a hidden name, never
    a half-written one under ``path``.
    """
    path = Path(path)
    if path.exists() and not force:
        raise InputError(f"{path} exists; pass --force to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_next_to(path, ".tmp", folder=True)
    try:
        yield tmp
        old = None
        if path.exists():
            old = _temp_next_to(path, ".old", folder=True)
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_log(path: str | os.PathLike) -> IO[str]:
    """A log that a running process streams into (a worker's stderr), written in place on purpose:
    after a crash the partial log is the evidence. qadapt's only non-atomic writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "w")


def atomic_write(path: str | os.PathLike, data: str | bytes, *, force: bool = False) -> Path:
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w", force=force) as f:
        f.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, *, force: bool = False) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2) + "\n", force=force)


def read_fd(path: str | os.PathLike) -> int:
    """A read-only descriptor (close-on-exec) for ``os.pread``-style reads; the caller closes it."""
    return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Parse a JSON file; errors name the file and the line/column of a syntax error."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path} is a directory, expected a file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {what} {path}: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FormatError(f"{what} {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """Tensor name -> ``{"dtype", "shape", "data_offsets"}`` from a safetensors header.

    Reads only the header; validates the sizes against the file so that a
    hostile header cannot drive a large allocation or a read past the end.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise FormatError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise FormatError(f"{path}: safetensors header length {n} does not fit a {size}-byte file")
            header = json.loads(f.read(n))
    except OSError as e:
        raise InputError(f"cannot read {path}: {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FormatError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = 1
            for d in shape:
                if not isinstance(d, int) or d < 0:
                    raise ValueError
                numel *= d
            itemsize = SAFETENSORS_DTYPES[dtype]
        except (KeyError, TypeError, ValueError):
            raise FormatError(f"{path}: tensor `{name}` has a malformed header entry") from None
        if not (0 <= start <= end <= data_size) or end - start != numel * itemsize:
            raise FormatError(
                f"{path}: tensor `{name}` ({dtype}{list(shape)}) has offsets {start}..{end} that do not "
                f"match its size {numel * itemsize} or the file's {data_size} data bytes"
            )
        spans.append((start, end, name))
    spans.sort()
    for (s0, e0, n0), (s1, e1, n1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise FormatError(f"{path}: tensors `{n0}` and `{n1}` overlap in the data section")
    return header
