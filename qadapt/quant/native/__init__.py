"""Exact CPU matmul kernels over raw GGUF blocks: a C library called through ctypes.

``ggml_kernels.c`` (next to this file) holds, for every GGUF type qadapt runs, a
dequantizer that reproduces gguf-py's float32 weights bit for bit and an
``x @ W.T`` that multiplies them into the inputs straight from the block bytes,
one row at a time in L1, with float32 accumulation and OpenMP over output rows,
plus llama.cpp-style 8-bit kernels and the fused decode step (``kernels="q8"``).

It is built at install time (setup.py) once per instruction-set level, as
``_qadapt_kernels_<variant>`` beside this file: ``portable`` (plain C, any CPU), ``avx2``,
``avxvnni``, ``avx512vnni``; :func:`library` loads the best one this CPU supports (the
portable build's ``qa_cpu_features`` says which), so one wheel runs on any x86-64. A
checkout that was never built compiles the source on first use instead (``-march=native``,
into ``<qadapt cache>/native/``): a developer's fallback. ``QADAPT_NATIVE=0`` switches the
kernels off. Running without them is a WARNING that says why: the torch paths are about
3x slower to decode.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import struct
import subprocess
import sysconfig
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

from ...cache import cache_root
from ...io import atomic_path, atomic_write

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("ggml_kernels.c")
#: the install-time builds, best first, and the ``qa_cpu_features`` bits each needs (setup.py's variants)
VARIANTS: tuple[tuple[str, int], ...] = (("avx512vnni", 1 | 4), ("avxvnni", 1 | 2), ("avx2", 1), ("portable", 0))
#: Tried in order until one compiles: without OpenMP the kernels run on one thread, without
#: -march=native on baseline SIMD. -ffp-contract=off keeps gguf-py's rounding in the dequantizers.
FLAG_SETS: tuple[tuple[str, ...], ...] = (
    ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off"),
    ("-O3", "-march=native", "-ffp-contract=off"),
    ("-O3", "-ffp-contract=off"),
)
#: GGUF types the C source implements: the rows of its generated type table (``ggml_types.h``).
HEADER = SOURCE.with_name("ggml_types.h")
TYPES: frozenset[str] = frozenset(re.findall(r"QA_TYPE\((\w+), \d+,", HEADER.read_text()))


def source_sha() -> str:
    """The first 16 hex digits of sha256(ggml_kernels.c + ggml_types.h), as setup.py compiles it into each build."""
    return hashlib.sha256(SOURCE.read_bytes() + HEADER.read_bytes()).hexdigest()[:16]
_COMPILE_TIMEOUT_S = 120

_i64, _int, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p


def enabled() -> bool:
    """False when ``QADAPT_NATIVE=0`` (read at each call, so tests and users can switch)."""
    return os.environ.get("QADAPT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


class NativeKernels:
    """The loaded shared library, with tensor-level wrappers around its two entry points."""

    def __init__(self, path: Path):
        self.path = path
        lib = ctypes.CDLL(str(path))
        self._matmul = lib.qa_matmul
        self._matmul.argtypes = [_int, _ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64, _int]
        self._matmul.restype = _int
        self._dequant = lib.qa_dequant
        self._dequant.argtypes = [_int, _ptr, _i64, _i64, _i64, _ptr, _i64, _int]
        self._dequant.restype = _int
        self._matmul_q8 = lib.qa_matmul_q8
        self._matmul_q8.argtypes = self._matmul.argtypes
        self._matmul_q8.restype = _int
        self._quantize_q8 = lib.qa_quantize_q8
        self._quantize_q8.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _ptr]
        self._quantize_q8.restype = _int
        self._x8_bytes = lib.qa_x8_bytes
        self._x8_bytes.argtypes = [_int, _i64, _i64]
        self._x8_bytes.restype = _i64
        self._x8_convert = lib.qa_x8_convert
        self._x8_convert.argtypes = [_int, _ptr, _i64, _i64, _i64, _ptr, _int, _int]
        self._x8_convert.restype = _int
        self._matmul_x8 = lib.qa_matmul_x8
        self._matmul_x8.argtypes = [_int, _ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _i64, _int]
        self._matmul_x8.restype = _int
        self._multi = lib.qa_matmul_x8_lora
        self._multi.argtypes = [_int, _ptr, _i64, _ptr, _i64, _i64, _ptr, _i64, _i64, _ptr, _int]
        self._multi.restype = _int
        self._mlp = lib.qa_mlp_x8_lora
        self._mlp.argtypes = [_ptr, _i64, _i64, _ptr, ctypes.c_float, _ptr, _i64, _int, _ptr, _i64, _ptr, _i64, _ptr,
                              _ptr, _int]
        self._mlp.restype = _int
        self._rms = lib.qa_rms_norm
        self._rms.argtypes = [_ptr, _i64, _i64, _ptr, ctypes.c_float, _ptr]
        self._layers = lib.qa_decode_layers
        self._layers.argtypes = [_i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _int]
        self._layers.restype = _int
        self._attn_rows = lib.qa_attn_decode_rows
        self._attn_rows.argtypes = [_i64, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr,
                                    _ptr, _ptr, _int]
        self._attn_rows.restype = _int
        self._lora_rows = lib.qa_lora_rows
        self._lora_rows.argtypes = [_i64, _ptr, _ptr, _i64, _i64, _i64, _ptr, _i64, _i64, _int]
        self._lora_rows.restype = _int
        self._q8_types = frozenset(q for q in TYPES if lib.qa_q8_supported(_type_id(q)))
        self.simd = bool(lib.qa_simd())
        self.openmp = bool(lib.qa_openmp())
        self.variant = ""

    @staticmethod
    def supports(qtype: str) -> bool:
        return qtype in TYPES

    def matmul(self, raw: torch.Tensor, qtype: str, in_features: int, x2d: torch.Tensor) -> torch.Tensor:
        """``x2d @ W.T`` for W the uint8 [out, bytes_per_row] view ``raw``: float32 [m, out].

        ``x2d`` is converted to contiguous float32 (exact for bf16/fp16 inputs).
        """
        return self._file_layout_matmul(self._matmul, "matmul", raw, qtype, in_features, x2d)

    def _file_layout_matmul(self, fn, what: str, raw: torch.Tensor, qtype: str, in_features: int,
                            x2d: torch.Tensor) -> torch.Tensor:
        x = x2d.to(torch.float32).contiguous()
        m, n = x.shape[0], raw.shape[0]
        y = torch.empty(m, n, dtype=torch.float32)
        rc = fn(_type_id(qtype), raw.data_ptr(), n, in_features, raw.shape[1], x.data_ptr(), in_features, m,
                y.data_ptr(), n, torch.get_num_threads())
        if rc:
            raise ValueError(f"native {what} refused a {qtype} weight [{n}, {in_features}] "
                             f"({raw.shape[1]} bytes/row, code {rc})")
        return y

    def supports_q8(self, qtype: str) -> bool:
        """True when :meth:`matmul_q8` runs ``qtype`` (AVX2 builds: the 32- and 256-blocks with 4-8 bit codes)."""
        return qtype in self._q8_types

    def matmul_q8(self, raw: torch.Tensor, qtype: str, in_features: int, x2d: torch.Tensor) -> torch.Tensor:
        """``x2d @ W.T`` as llama.cpp computes it: ``x2d`` quantized to 8 bits per block of 32
        (see ``ggml_kernels.c``), integer dot products per weight block. Float32 [m, out]."""
        return self._file_layout_matmul(self._matmul_q8, "8-bit matmul", raw, qtype, in_features, x2d)

    def matmul_x8_multi(self, plan: torch.Tensor, out_features: int, in_features: int,
                        x2d: torch.Tensor, lora: torch.Tensor | None = None) -> torch.Tensor:
        """Several 8-row-layout weights on one input: ``plan`` int64 [n, 3] = (type id, layout address,
        rows) per weight (:meth:`x8_plan`), float32 [m, sum of rows] with the outputs side by side; plus,
        when given, the LoRA deltas of a :func:`lora_plan` on the same input and output, in the same call."""
        x = x2d if x2d.dtype == torch.float32 and x2d.is_contiguous() else x2d.to(torch.float32).contiguous()
        m = x.shape[0]
        y = torch.empty(m, out_features, dtype=torch.float32)
        nl = 0 if lora is None else lora.shape[0]
        rc = self._multi(plan.shape[0], plan.data_ptr(), in_features, x.data_ptr(), in_features, m, y.data_ptr(),
                         out_features, nl, lora.data_ptr() if nl else None, torch.get_num_threads())
        if rc:
            raise ValueError(f"native grouped matmul refused its plan (code {rc})")
        return y

    def mlp_x8(self, x: torch.Tensor, norm_w: torch.Tensor, eps: float, gate_up: torch.Tensor, ff: int,
               down_qtype: str, down: torch.Tensor, lora_gate_up: torch.Tensor | None = None,
               lora_down: torch.Tensor | None = None) -> torch.Tensor:
        """``x + down(silu(gate(h)) * up(h))``, h = rms_norm(x), in one call (float32 contiguous x [..., K];
        ``gate_up``: the :meth:`x8_plan` of gate then up, ``down``: the 8-row layout of the [K, ff] weight),
        with the LoRA deltas of :func:`lora_plan`s on gate/up's outputs and on down's when given."""
        K = x.shape[-1]
        out = torch.empty_like(x)
        ngu = 0 if lora_gate_up is None else lora_gate_up.shape[0]
        nd = 0 if lora_down is None else lora_down.shape[0]
        rc = self._mlp(x.data_ptr(), x.numel() // K, K, norm_w.data_ptr(), eps, gate_up.data_ptr(), ff,
                       _type_id(down_qtype), down.data_ptr(), ngu, lora_gate_up.data_ptr() if ngu else None,
                       nd, lora_down.data_ptr() if nd else None, out.data_ptr(), torch.get_num_threads())
        if rc:
            raise ValueError(f"native MLP refused its weights (code {rc})")
        return out

    @staticmethod
    def x8_plan(weights: list[tuple[str, torch.Tensor, int]]) -> torch.Tensor:
        """The plan of :meth:`matmul_x8_multi` for (qtype, packed layout, out_features) triples; the layouts
        must stay alive (and unmoved) as long as the plan is used."""
        return torch.tensor([[_type_id(q), t.data_ptr(), n] for q, t, n in weights], dtype=torch.int64)

    # ---- one-row decode helpers (float32, contiguous tensors; callers check shapes)
    def rms_norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        out = torch.empty_like(x)
        n = w.shape[0]
        self._rms(x.data_ptr(), x.numel() // n, n, w.data_ptr(), eps, out.data_ptr())
        return out

    def attn_decode(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    kc: torch.Tensor, vc: torch.Tensor, pos: torch.Tensor, first: torch.Tensor, H: int, Hkv: int,
                    D: int) -> torch.Tensor:
        """B rows of one new token each (contiguous float32): rotary on q [B, H*D] and k [B, Hkv*D] (in place),
        k/v into the caches [B, Hkv, S, D] at ``pos`` [B] (int64), attention over keys first..pos: [B, H*D]."""
        B = pos.shape[0]
        out = torch.empty(B, H * D, dtype=torch.float32)
        rc = self._attn_rows(B, q.data_ptr(), k.data_ptr(), v.data_ptr(), H, Hkv, D, cos.shape[-1], cos.data_ptr(),
                             sin.data_ptr(), kc.data_ptr(), vc.data_ptr(), kc.shape[-2], pos.data_ptr(),
                             first.data_ptr(), out.data_ptr(), torch.get_num_threads())
        if rc:
            raise ValueError(f"native attention refused H={H} Hkv={Hkv} D={D} pos={pos.tolist()}")
        return out

    #: int64 fields per layer of :meth:`decode_layers`' plan (QA_LAYER_FIELDS in the C source)
    LAYER_FIELDS = 28

    def decode_layers(self, plans: torch.Tensor, x: torch.Tensor, H: int, Hkv: int, D: int, cos: torch.Tensor,
                      sin: torch.Tensor, pos: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """One decode step through every layer of ``plans`` (int64 [layers, LAYER_FIELDS], built by the
        decoder): x float32 contiguous [B, K] (one new token per row) is updated in place and returned."""
        B, K = x.shape[0], x.shape[-1]
        rc = self._layers(plans.shape[0], plans.data_ptr(), x.data_ptr(), B, K, H, Hkv, D, cos.shape[-1],
                          cos.data_ptr(), sin.data_ptr(), pos.data_ptr(), first.data_ptr(), torch.get_num_threads())
        if rc:
            raise ValueError(f"native decode step refused its plan (code {rc})")
        return x

    def lora_rows(self, y: torch.Tensor, x: torch.Tensor, plan: torch.Tensor) -> torch.Tensor:
        """``y[row] += scale * (x[row] A^T) Bt`` in place for each entry of ``plan`` (see :func:`lora_plan`);
        x, y float32 rows [rows, in] / [rows, out] (or [rows, 1, features]) with unit stride along features
        (:func:`row_stride`). The factors must stay alive while the plan is used."""
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"native LoRA: {x.shape[0]} input rows but {y.shape[0]} output rows")
        rc = self._lora_rows(plan.shape[0], plan.data_ptr(), x.data_ptr(), row_stride(x), x.shape[0], x.shape[-1],
                             y.data_ptr(), row_stride(y), y.shape[-1], torch.get_num_threads())
        if rc == -3:
            raise MemoryError(f"native LoRA: no memory for the deltas of {plan.shape[0]} plan entries")
        if rc:
            raise ValueError(f"native LoRA refused its plan (an entry outside the {x.shape[0]} x {y.shape[-1]} output, "
                             f"a rank above 256, or factors for another input width; code {rc})")
        return y

    def x8_bytes(self, qtype: str, out_features: int, in_features: int) -> int:
        """Bytes of the 8-row interleaved layout of this weight, 0 when it has none (type, shape or CPU)."""
        return int(self._x8_bytes(_type_id(qtype), out_features, in_features))

    def repack_x8(self, raw: torch.Tensor, qtype: str, in_features: int) -> torch.Tensor:
        """The uint8 [out, bytes_per_row] file-layout weight in the 8-row layout (same bytes, see ``ggml_kernels.c``)."""
        n = raw.shape[0]
        out = torch.empty(self.x8_bytes(qtype, n, in_features), dtype=torch.uint8)
        rc = self._x8_convert(_type_id(qtype), raw.data_ptr(), n, in_features, raw.shape[1], out.data_ptr(), 0,
                              torch.get_num_threads())
        if rc:
            raise ValueError(f"native repack refused a {qtype} weight [{n}, {in_features}] (code {rc})")
        return out

    def unrepack_x8(self, packed: torch.Tensor, qtype: str, out_features: int, in_features: int,
                    row_bytes: int) -> torch.Tensor:
        """The inverse of :meth:`repack_x8`: the file layout, uint8 [out, row_bytes]."""
        raw = torch.empty(out_features, row_bytes, dtype=torch.uint8)
        rc = self._x8_convert(_type_id(qtype), raw.data_ptr(), out_features, in_features, row_bytes,
                              packed.data_ptr(), 1, torch.get_num_threads())
        if rc:
            raise ValueError(f"native unpack refused a {qtype} weight [{out_features}, {in_features}] (code {rc})")
        return raw

    def matmul_x8(self, packed: torch.Tensor, qtype: str, out_features: int, in_features: int,
                  x2d: torch.Tensor) -> torch.Tensor:
        """:meth:`matmul_q8` on the 8-row layout of :meth:`repack_x8` (the same numbers, one instruction per 8 rows)."""
        x = x2d.to(torch.float32).contiguous()
        m = x.shape[0]
        y = torch.empty(m, out_features, dtype=torch.float32)
        rc = self._matmul_x8(_type_id(qtype), packed.data_ptr(), out_features, in_features, x.data_ptr(),
                             in_features, m, y.data_ptr(), out_features, torch.get_num_threads())
        if rc:
            raise ValueError(f"native 8-bit matmul refused a {qtype} weight [{out_features}, {in_features}] (code {rc})")
        return y

    def quantize_q8(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The activation quantization of :meth:`matmul_q8` alone: (scales [m, k/32], codes int8 [m, k])."""
        x = x2d.to(torch.float32).contiguous()
        m, k = x.shape
        d, q = torch.empty(m, k // 32, dtype=torch.float32), torch.empty(m, k, dtype=torch.int8)
        rc = self._quantize_q8(x.data_ptr(), k, m, k, d.data_ptr(), q.data_ptr())
        if rc:
            raise ValueError(f"native 8-bit quantization refused [{m}, {k}] (code {rc})")
        return d, q

    def dequantize(self, raw: torch.Tensor, qtype: str, in_features: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 [rows, bytes_per_row] -> float32 [rows, in_features], gguf-py's bits."""
        rows = raw.shape[0]
        if out is None:
            out = torch.empty(rows, in_features, dtype=torch.float32)
        assert out.dtype == torch.float32 and out.shape == (rows, in_features) and out.stride(1) == 1
        rc = self._dequant(_type_id(qtype), raw.data_ptr(), rows, in_features, raw.shape[1], out.data_ptr(),
                           out.stride(0), torch.get_num_threads())
        if rc:
            raise ValueError(f"native dequantize refused a {qtype} weight [{rows}, {in_features}]")
        return out


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4


def row_stride(t: torch.Tensor) -> int | None:
    """Floats between rows of ``t`` seen as [rows, features] (2-D, or 3-D with one position per row) when
    its features are contiguous, else None: the layouts the native row kernels take in place."""
    if t.dtype != torch.float32 or t.stride(-1) != 1 or not (t.dim() == 2 or (t.dim() == 3 and t.shape[1] == 1)):
        return None
    return t.stride(0) if t.shape[0] > 1 else t.shape[-1]


#: int64 fields per LoRA plan entry (QA_LORA_FIELDS in the C source)
LORA_FIELDS = 9
#: the factor dtypes the LoRA kernel reads as they are (ggml type names: converted in registers)
LORA_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def lora_plan(entries) -> torch.Tensor:
    """The plan of :meth:`NativeKernels.lora_rows` from (row, A [r, in], Bt [r, out], scale[, col]) entries:
    int64 [n, 9] of row, the two factors' addresses, rank, the scale's double bits, where the entry's outputs
    start in y's row (col, default 0), how many (out), A's row length (in) and the factors' element type
    (float32, float16 or bfloat16, both factors the same). The C side refuses an entry outside the call's rows
    and output columns, or built for another input width."""
    rows = []
    for e in entries:
        row, A, Bt, s = e[:4]
        col = e[4] if len(e) > 4 else 0
        if A.dtype != Bt.dtype or A.dtype not in LORA_DTYPES or not (A.is_contiguous() and Bt.is_contiguous()):
            raise ValueError(f"native LoRA: factors {A.dtype}/{Bt.dtype} (contiguous {A.is_contiguous()}/"
                             f"{Bt.is_contiguous()}); it takes contiguous float32, float16 or bfloat16 pairs")
        rows.append([row, A.data_ptr(), Bt.data_ptr(), A.shape[0], struct.unpack("<q", struct.pack("<d", s))[0],
                     col, Bt.shape[1], A.shape[1], _type_id(LORA_DTYPES[A.dtype])])
    return torch.tensor(rows, dtype=torch.int64).view(-1, LORA_FIELDS)


def _memmap_root(data):
    """The ``numpy.memmap`` of a file that ``data`` views (through any chain of views), else None."""
    import numpy as np

    base, root = data, None
    while isinstance(base, np.ndarray):
        if isinstance(base, np.memmap):
            root = base
        base = base.base
    return root if root is not None and getattr(root, "filename", None) else None


def mapped_file(data) -> tuple[str, int] | None:
    """(path, byte offset in the file) of ``data`` when it views a memory-mapped file, else None."""
    import numpy as np

    root = _memmap_root(data)
    if root is None:
        return None
    addr = np.asarray(data).__array_interface__["data"][0]
    return str(root.filename), addr - root.__array_interface__["data"][0] + int(root.offset)


def release_pages(data) -> bool:
    """Drop this process's mapping of the whole pages under ``data`` when it is a view of a
    memory-mapped file (``numpy.memmap``), so they stop counting in its resident set; a later
    read faults them in again from the page cache, so this never loses data. Anything else
    (private copies, tensors) is left alone: madvise would zero anonymous memory. Linux only."""
    import numpy as np

    if _memmap_root(data) is None or not hasattr(ctypes, "CDLL") or platform.system() != "Linux":
        return False
    arr = np.asarray(data)
    start = arr.__array_interface__["data"][0]
    lo = -(-start // _PAGE) * _PAGE
    hi = (start + arr.nbytes) // _PAGE * _PAGE
    if hi <= lo:
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0


def trim_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    Loading frees many short-lived buffers (GGUF metadata, adapter files, layout copies); glibc
    keeps their pages, so without this a loaded model's resident set holds its load's high-water
    mark rather than what it keeps. Costs a few milliseconds, once per load."""
    if platform.system() != "Linux":
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


@functools.lru_cache(maxsize=None)
def _type_id(qtype: str) -> int:
    return int(GGMLQuantizationType[qtype].value)


def compiler() -> str | None:
    """``$CC`` (one executable) when it is found, else the first of cc, gcc, clang on PATH."""
    cc = os.environ.get("CC", "").strip()
    if cc and shutil.which(cc):
        return shutil.which(cc)
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_id() -> str:
    """What -march=native depends on: the CPU model and feature flags (Linux), else the platform."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
        keep = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
        return "\n".join(sorted(set(keep)))
    except OSError:
        return platform.platform() + platform.processor()


def _key(cc: str, flags: tuple[str, ...]) -> str:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes().decode() + HEADER.read_text(), " ".join(flags), cc, version, _cpu_id(),
                 platform.machine()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:24]


def build(cache_dir: str | os.PathLike | None = None,
          flag_sets: tuple[tuple[str, ...], ...] = FLAG_SETS) -> Path | None:
    """The compiled library's path (built now unless cached), or None when no flag set compiles.

    Each flag set has its own cache entry; one that failed leaves ``<hash>.failed`` (the
    compiler's message), so later processes go straight to the next set."""
    cc = compiler()
    if cc is None:
        logger.warning("native GGUF kernels: not installed with the package and no C compiler found (cc, gcc, clang "
                       "or $CC) to build them; running on torch's paths (decoding ~3x slower). Reinstall qadapt "
                       "with a C compiler present to get them")
        return None
    folder = cache_root(cache_dir) / "native"
    for flags in flag_sets:
        key = _key(cc, flags)
        path, failed = folder / f"{key}.so", folder / f"{key}.failed"
        if path.exists():
            return path
        if failed.exists():
            continue
        t0 = time.perf_counter()
        try:
            with atomic_path(path, force=True) as tmp:
                proc = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(tmp), str(SOURCE), "-lm"],
                                      capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
                if proc.returncode != 0:
                    raise RuntimeError(proc.stderr.strip()[-2000:])
        except (OSError, subprocess.SubprocessError, RuntimeError) as e:
            logger.debug("native GGUF kernels: %s %s failed: %s", cc, " ".join(flags), e)
            if isinstance(e, (RuntimeError, subprocess.TimeoutExpired)):  # remembered: no process retries it
                try:
                    atomic_write(failed, f"{cc} {' '.join(flags)}\n{e}\n", force=True)
                except OSError:
                    pass
            continue
        logger.info("native GGUF kernels: compiled %s with %s in %.1f s", path, " ".join(flags),
                    time.perf_counter() - t0)
        return path
    logger.warning("native GGUF kernels: %s could not compile %s (see %s); running on torch's paths (decoding ~3x "
                   "slower)", cc, SOURCE.name, folder)
    return None


def installed_variants() -> dict[str, Path]:
    """The install-time builds present beside this module and built from its source: variant -> library path.
    A build of another version of ``ggml_kernels.c`` (a checkout edited since ``pip install -e .``) is left out,
    with a warning."""
    here = Path(__file__).resolve().parent
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    sha = source_sha()
    found, stale = {}, []
    for name, _ in VARIANTS:
        for cand in (here / f"_qadapt_kernels_{name}{suffix}", *here.glob(f"_qadapt_kernels_{name}.*")):
            if cand.is_file():
                if _built_from(cand) == sha:
                    found[name] = cand
                else:
                    stale.append(cand.name)
                break
    if stale:
        logger.warning("native GGUF kernels: %s were built from another version of %s; not using them (rebuild "
                       "with `pip install -e .`)", ", ".join(stale), SOURCE.name)
    return found


def _built_from(path: Path) -> str | None:
    try:
        fn = ctypes.CDLL(str(path)).qa_source_sha
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def cpu_features(builds: dict[str, Path]) -> int:
    """``qa_cpu_features`` of this CPU, asked of the portable build (any x86-64 runs it); 0 without one."""
    path = builds.get("portable")
    if path is None:
        return 0
    try:
        return int(ctypes.CDLL(str(path)).qa_cpu_features())
    except (OSError, AttributeError):
        return 0


def _pick(builds: dict[str, Path]) -> NativeKernels | None:
    """The best install-time build this CPU supports that loads; None (with a warning naming why) if none."""
    have = cpu_features(builds)
    reasons = []
    for name, need in VARIANTS:
        if name not in builds or have & need != need:
            continue
        try:
            lib = NativeKernels(builds[name])
        except (OSError, AttributeError) as e:  # e.g. the OpenMP runtime missing on this machine
            reasons.append(f"{builds[name].name}: {e}")
            continue
        lib.variant = name
        return lib
    why = "; ".join(reasons) or f"none of the installed builds ({', '.join(builds)}) runs on this CPU"
    logger.warning("native GGUF kernels unavailable (%s); running on torch's paths (decoding ~3x slower)", why)
    return None


@functools.lru_cache(maxsize=1)
def _load() -> NativeKernels | None:
    forced = os.environ.get("QADAPT_NATIVE_LIB")
    if forced:  # a given build (the sanitizer test's), used as it is
        lib = NativeKernels(Path(forced))
        lib.variant = "QADAPT_NATIVE_LIB"
        return lib
    builds = installed_variants()
    if builds:
        lib = _pick(builds)
    else:  # a checkout that was never built: compile on first use (developers)
        try:
            path = build()
            lib = None if path is None else NativeKernels(path)
        except Exception as e:  # never fail a model load over an optional accelerator
            logger.warning("native GGUF kernels unavailable (%s); running on torch's paths (decoding ~3x slower)",
                           e)
            return None
        if lib is not None:
            lib.variant = "native (compiled on first use)"
    if lib is not None:
        logger.info("native GGUF kernels: %s (%s; simd=%s, openmp=%s)", lib.path.name, lib.variant, lib.simd,
                    lib.openmp)
    return lib


_said_disabled = False


def library() -> NativeKernels | None:
    """The kernels, or None (disabled by ``QADAPT_NATIVE=0``, or unavailable)."""
    global _said_disabled
    if not enabled():
        if not _said_disabled:
            logger.info("native GGUF kernels disabled by QADAPT_NATIVE; using the torch paths")
            _said_disabled = True
        return None
    return _load()


def reset() -> None:
    """Forget the loaded library so the next :func:`library` call builds/loads again (tests)."""
    _load.cache_clear()
