"""GGUF tensor types in torch: block maths per type, and the layers built on it.

Each type is one :class:`BlockType` subclass that registers itself in
:data:`BLOCK_TYPES` and writes only its block maths over a uint8 tensor
``[n_blocks, type_size]``; geometry comes from gguf-py's ``GGML_QUANT_SIZES``.
The float operations follow gguf-py's ``quants.py`` in order and dtype (float32
from fp16 scales, no fused multiply-add), so dequantization agrees with
``gguf.quants.dequantize`` bit for bit.

Raw tensors arrive as gguf-py hands them out: memory-mapped numpy arrays, uint8
``[rows, bytes_per_row]`` for block types (and BF16), float32/float16 ``[rows, cols]``
for F32/F16. They are turned into torch views of the same memory, never copied.
"""

from __future__ import annotations

import os
import warnings
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import FormatError, UnsupportedError
from ..io import read_fd
from .base import BaseLinear, DenseLinear, X8Weight
from . import kernels as _kernels, native, repack
from .kernels import check_kernels, Int4Packed, blockwise_matmul, int4pack_fits, kernel_path
from .types import block_geometry

QK_K = 256

#: IQ4_NL / IQ4_XS non-linear 4-bit codebook (llama.cpp's kvalues_iq4nl).
_IQ4_VALUES = torch.tensor((-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113),
                           dtype=torch.float32)

#: Type name -> block maths; filled by :class:`BlockType` subclasses as they are defined.
BLOCK_TYPES: dict[str, type["BlockType"]] = {}


# --------------------------------------------------------------------------- bit helpers
def _f16(b: torch.Tensor) -> torch.Tensor:
    """Two bytes per block [n, 2] -> float32 [n, 1] (fp16 -> fp32 is exact)."""
    return b.contiguous().view(torch.float16).float()


def _bits(b: torch.Tensor, shifts: tuple[int, ...], mask: int, width: int) -> torch.Tensor:
    """Fields of ``b`` [n, k * width]: for each run of ``width`` bytes, each shift in turn.

    Output [n, k * len(shifts) * width] in gguf-py's element order: run 0 at shift 0,
    run 0 at shift 1, ..., run 1 at shift 0, ...
    """
    n = b.shape[0]
    runs = b.reshape(n, -1, width)
    # one scalar shift per field: torch vectorises these, not a broadcast tensor shift
    return torch.stack([(runs >> s if s else runs) & mask for s in shifts], dim=2).reshape(n, -1)


def _nibbles(b: torch.Tensor, width: int) -> torch.Tensor:
    return _bits(b, (0, 4), 0x0F, width)


def _bit_planes(b: torch.Tensor, width: int) -> torch.Tensor:
    """One bit per element: bit i of byte j is element i * width + j."""
    return _bits(b, tuple(range(8)), 0x01, width)


def _bits32(b: torch.Tensor) -> torch.Tensor:
    """Four bytes per block [n, 4], read as a little-endian uint32 -> its 32 bits [n, 32]
    (bit i is element i), as gguf-py's ``qh.view(np.uint32)``."""
    shifts = torch.arange(32, dtype=torch.int32, device=b.device)
    return ((b.contiguous().view(torch.int32) >> shifts) & 1).to(torch.uint8)


def _iq4_values(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes -> IQ4 codebook values, float32 (index_select: a fast gather)."""
    return _IQ4_VALUES.to(codes.device).index_select(0, codes.reshape(-1).to(torch.int32)).reshape(codes.shape)


def _affine(scale: torch.Tensor, q: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """``scale * q (+ offset)`` per group: scale, offset [n, G]; q [n, G * group] -> float32 [n, G * group].

    Two rounded float32 operations in gguf-py's order (``a - b`` is ``a + -b`` exactly).
    """
    n, groups = scale.shape
    w = scale.unsqueeze(-1) * q.float().reshape(n, groups, -1)
    if offset is not None:
        w = w + offset.unsqueeze(-1)
    return w.reshape(n, -1)


def _split(b: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """Byte fields of a block, in order; the last field takes the rest."""
    return list(torch.split(b, [*sizes, b.shape[1] - sum(sizes)], dim=1))


def _k_scale_min(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes -> eight 6-bit scales and eight 6-bit mins, as float32."""
    d, m, md = (scales[:, i * 4:(i + 1) * 4] for i in range(3))
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc.float(), mn.float()


# --------------------------------------------------------------------------- block types
class BlockType:
    """One GGUF type's block maths; ``dequantize_blocks`` is the reference for every path.

    Types exactly expressible as 4-bit codes with one scale and zero per ``int4_group``
    weights also implement :meth:`int4_blocks`, which the int4pack kernel consumes.
    """

    name: ClassVar[str]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    int4_group: ClassVar[int | None] = None

    def __init_subclass__(cls, name: str, **kw) -> None:
        super().__init_subclass__(**kw)
        cls.name = name
        cls.block_size, cls.type_size = block_geometry(name)
        BLOCK_TYPES[name] = cls

    @staticmethod
    def dequantize_blocks(b: torch.Tensor) -> torch.Tensor:
        """uint8 [n, type_size] -> float32 [n, block_size]."""
        raise NotImplementedError

    @staticmethod
    def int4_blocks(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """uint8 [n, type_size] -> (codes [n, block_size] in 0..15, scale [n, g], zero [n, g])
        with ``w = (code - 8) * scale + zero`` per group of ``int4_group`` weights."""
        raise NotImplementedError


class F32(BlockType, name="F32"):
    @staticmethod
    def dequantize_blocks(b):
        return b.contiguous().view(torch.float32)


class F16(BlockType, name="F16"):
    @staticmethod
    def dequantize_blocks(b):
        return b.contiguous().view(torch.float16).float()


class BF16(BlockType, name="BF16"):
    @staticmethod
    def dequantize_blocks(b):
        return (b.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


class Q8_0(BlockType, name="Q8_0"):
    @staticmethod
    def dequantize_blocks(b):
        d, qs = _split(b, 2)
        return _affine(_f16(d), qs.contiguous().view(torch.int8))


class Q4_0(BlockType, name="Q4_0"):
    int4_group = 32

    @staticmethod
    def dequantize_blocks(b):
        d, qs = _split(b, 2)
        return _affine(_f16(d), _nibbles(qs, 16).to(torch.int8) - 8)

    @staticmethod
    def int4_blocks(b):
        d, qs = _split(b, 2)
        d = _f16(d)
        return _nibbles(qs, 16), d, torch.zeros_like(d)


class Q4_1(BlockType, name="Q4_1"):
    int4_group = 32

    @staticmethod
    def dequantize_blocks(b):
        d, m, qs = _split(b, 2, 2)
        return _affine(_f16(d), _nibbles(qs, 16), _f16(m))

    @staticmethod
    def int4_blocks(b):
        # d * q + m == (q - 8) * d + (m + 8 d)
        d, m, qs = _split(b, 2, 2)
        d = _f16(d)
        return _nibbles(qs, 16), d, _f16(m) + 8 * d


class Q5_0(BlockType, name="Q5_0"):
    @staticmethod
    def dequantize_blocks(b):
        d, qh, qs = _split(b, 2, 4)
        q = _nibbles(qs, 16) | (_bits32(qh) << 4)
        return _affine(_f16(d), q.to(torch.int8) - 16)


class Q5_1(BlockType, name="Q5_1"):
    @staticmethod
    def dequantize_blocks(b):
        d, m, qh, qs = _split(b, 2, 2, 4)
        q = _nibbles(qs, 16) | (_bits32(qh) << 4)
        return _affine(_f16(d), q, _f16(m))


class Q2_K(BlockType, name="Q2_K"):
    @staticmethod
    def dequantize_blocks(b):
        scales, qs, d, dmin = _split(b, QK_K // 16, QK_K // 4, 2)
        dl = _f16(d) * (scales & 0x0F).float()
        ml = _f16(dmin) * (scales >> 4).float()
        return _affine(dl, _bits(qs, (0, 2, 4, 6), 0x03, 32), -ml)


class Q3_K(BlockType, name="Q3_K"):
    @staticmethod
    def dequantize_blocks(b):
        hmask, qs, scales, d = _split(b, QK_K // 8, QK_K // 4, 12)
        lo = _bits(scales[:, :8], (0, 4), 0x0F, 8)
        hi = _bits(scales[:, 8:], (0, 2, 4, 6), 0x03, 4)
        sc = ((lo | (hi << 4)).to(torch.int8) - 32).float()
        ql = _bits(qs, (0, 2, 4, 6), 0x03, 32).to(torch.int8)
        qh = (_bit_planes(hmask, 32) ^ 1).to(torch.int8)  # the offset is 0 where the bit is 1
        return _affine(_f16(d) * sc, ql - (qh << 2))


class Q4_K(BlockType, name="Q4_K"):
    int4_group = 32

    @staticmethod
    def _parts(b):
        d, dmin, scales, qs = _split(b, 2, 2, 12)
        sc, mn = _k_scale_min(scales)
        return _f16(d) * sc, _f16(dmin) * mn, _nibbles(qs, 32)

    @staticmethod
    def dequantize_blocks(b):
        dl, ml, q = Q4_K._parts(b)
        return _affine(dl, q, -ml)

    @staticmethod
    def int4_blocks(b):
        # dl * q - ml == (q - 8) * dl + (8 dl - ml), per sub-block of 32
        dl, ml, q = Q4_K._parts(b)
        return q, dl, 8 * dl - ml


class Q5_K(BlockType, name="Q5_K"):
    @staticmethod
    def dequantize_blocks(b):
        d, dmin, scales, qh, qs = _split(b, 2, 2, 12, QK_K // 8)
        sc, mn = _k_scale_min(scales)
        return _affine(_f16(d) * sc, _nibbles(qs, 32) | (_bit_planes(qh, 32) << 4), -(_f16(dmin) * mn))


class Q6_K(BlockType, name="Q6_K"):
    @staticmethod
    def dequantize_blocks(b):
        ql, qh, scales, d = _split(b, QK_K // 2, QK_K // 4, QK_K // 16)
        dl = _f16(d) * scales.contiguous().view(torch.int8).float()
        q = (_nibbles(ql, 64) | (_bits(qh, (0, 2, 4, 6), 0x03, 32) << 4)).to(torch.int8) - 32
        return _affine(dl, q)


class IQ4_NL(BlockType, name="IQ4_NL"):
    @staticmethod
    def dequantize_blocks(b):
        d, qs = _split(b, 2)
        return _affine(_f16(d), _iq4_values(_nibbles(qs, 16)))


class IQ4_XS(BlockType, name="IQ4_XS"):
    @staticmethod
    def dequantize_blocks(b):
        d, sh, sl, qs = _split(b, 2, 2, QK_K // 64)
        lo = _bits(sl, (0, 4), 0x0F, 1)
        sh16 = sh[:, :1].to(torch.int32) | (sh[:, 1:].to(torch.int32) << 8)
        hi = (sh16 >> torch.arange(0, 16, 2, dtype=torch.int32, device=b.device)) & 0x03
        sc = ((lo.to(torch.int32) | (hi << 4)) - 32).float()
        return _affine(_f16(d) * sc, _iq4_values(_nibbles(qs, 16)))


# --------------------------------------------------------------------------- raw tensors
def block_type(qtype: str) -> type[BlockType]:
    try:
        return BLOCK_TYPES[qtype]
    except KeyError:
        raise UnsupportedError(f"GGUF type {qtype} is not supported; qadapt runs {', '.join(BLOCK_TYPES)}") from None


def raw_bytes(data: np.ndarray | torch.Tensor, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 torch view [rows, bytes_per_row] of the same memory as ``data``, no copy.

    ``shape`` is the torch-order shape ([rows, cols], or [n] for a vector).
    """
    bt = block_type(qtype)
    cols = shape[-1]
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if cols % bt.block_size:
        raise FormatError(
            f"{qtype} tensor of shape {tuple(shape)}: {cols} columns are not whole blocks of {bt.block_size}"
        )
    bpr = cols // bt.block_size * bt.type_size
    if isinstance(data, torch.Tensor):
        t = data.detach()
    else:
        with warnings.catch_warnings():  # gguf-py maps read-only; we never write through this view
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(np.ascontiguousarray(data))
    t = t.contiguous().view(torch.uint8) if t.dtype != torch.uint8 else t.contiguous()
    if t.numel() != rows * bpr:
        raise FormatError(f"{qtype} tensor of shape {tuple(shape)} needs {rows * bpr} bytes, got {t.numel()}")
    return t.reshape(rows, bpr)


def dequantize_rows(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """uint8 [rows, bytes_per_row] -> float32 [rows, cols], vectorised over all blocks."""
    bt = block_type(qtype)
    rows = raw.shape[0]
    blocks = raw.reshape(-1, bt.type_size)
    return bt.dequantize_blocks(blocks).reshape(rows, -1)


def dequantize_array(data: np.ndarray | torch.Tensor, qtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    """float32 tensor of ``shape`` from raw GGUF data (norms, biases, whole small tensors)."""
    return dequantize_rows(raw_bytes(data, qtype, shape), qtype).reshape(shape)


def take_rows(data: np.ndarray, qtype: str, rows: torch.Tensor | np.ndarray) -> np.ndarray:
    """The rows ``rows`` of a raw 2-D GGUF tensor, still quantized (a copy, same layout).

    GGUF rows are independent whole blocks, so permuting rows of the byte array is exact
    (used to undo llama.cpp's q/k row permutation).
    """
    block_type(qtype)
    idx = rows.cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
    if idx.ndim != 1 or np.any(idx < 0) or np.any(idx >= data.shape[0]):
        raise FormatError(f"row selection for a {qtype} tensor of {data.shape[0]} rows is out of range")
    return np.asarray(data)[idx.astype(np.int64)]


# --------------------------------------------------------------------------- layers
class GGMLLinear(BaseLinear):
    """A linear layer over a GGUF tensor, computed without a dense float copy.

    ``raw`` stays a view of the memory-mapped file (file-backed pages, counted in no
    budget); the int4pack path adds its repacked weight (~0.625 byte/weight), the
    blockwise path dequantizes at most ``kernels.SCRATCH_BYTES`` at a time.
    ``dequantize()`` always returns the exact gguf-py weights.

    ``kernels="exact"``: ``compute_dtype`` (float32, exact up to accumulation order; or
    bfloat16) applies to the blockwise and dense paths. Small inputs go through the native
    kernels when they are available (see :mod:`.kernels`): float32 whatever ``compute_dtype``
    says, since that is both exact and fastest there.

    ``kernels="q8"`` / ``"auto"`` (the default): llama.cpp's arithmetic on the types the native
    library runs that way (``NativeKernels.supports_q8``): inputs quantized to 8 bits per block of
    32, integer dot products per weight block (error bound in ``ggml_kernels.c``). Q4_0, Q8_0,
    Q4_K and Q6_K are repacked once into the 8-row layout (every input size; the file's pages are
    released), the others run on the file's bytes up to ``Q8_ROW_MAX_BATCH`` rows. Other types,
    and every type without the native library, take the exact paths, except the 4-bit types
    without it, which take torch's int4 kernel (bf16 activations: fast, not exact).
    """

    def __init__(
        self, data: np.ndarray | torch.Tensor, qtype: str, shape: tuple[int, int],
        bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32, kernels: str = "exact",
        row_perm: torch.Tensor | None = None,
    ):
        super().__init__()
        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise UnsupportedError(f"compute_dtype must be float32 or bfloat16, got {compute_dtype}")
        check_kernels(kernels)
        self.out_features, self.in_features = shape
        self.qtype = qtype
        self.compute_dtype = compute_dtype
        # the weight's storage is registered (memory_bytes, state_dict and .to() see it): the file's blocks,
        # or their 8-row repack, or the int4 kernel's packed copy beside them
        self.register_buffer("_raw", raw_bytes(data, qtype, shape))
        self._row_bytes = self._raw.shape[1]
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.float32))
        self.register_buffer("_x8", None)
        self._pending = None  # the file's mapped blocks while the 8-row repack waits (see x8)
        #: rows to take from the file's (llama.cpp's q/k order), done by the deferred repack, else right here
        self._row_perm = row_perm
        self.register_buffer("int4_packed", None)
        self.register_buffer("int4_scales", None)
        self._int4_group = 0
        bt = block_type(qtype)
        if kernels == "triton":  # the device kernels: the file's blocks as they are (moved with .to(device))
            from .triton.ggml import TYPES

            self.path = "triton" if qtype in TYPES else "blockwise"
            self._native_type, self._lib = False, None
            self._take_rows_now(data)
            return
        lib = native.library()
        path = kernel_path(qtype, compute_dtype)
        if kernels != "exact" and lib is not None and lib.supports_q8(qtype):
            path = "q8"
        if path == "int4pack" and (kernels == "exact"
                                   or not int4pack_fits(self.out_features, self.in_features, bt.int4_group or 0)):
            path = "blockwise"  # exact: float32 activations (int4pack computes in bf16)
        if path == "int4pack" and not _kernels.INT4PACK_WITH_NATIVE and lib is not None:
            path = "blockwise"  # the native kernels run it exactly, without a repacked copy
        self.path = path
        self._native_type = native.NativeKernels.supports(qtype)
        self._lib = lib if path == "q8" else None  # held: q8 layers never fall back to torch
        if path == "q8" and lib.x8_bytes(qtype, self.out_features, self.in_features):
            self._pending = data
            if not repack.deferring():
                self.x8()
            return
        self._take_rows_now(data)
        if path == "int4pack":
            packed = Int4Packed.from_codes(self._int4_rows, self.out_features, bt.int4_group)
            self.int4_packed, self.int4_scales, self._int4_group = packed.packed, packed.scales_and_zeros, packed.group

    def _take_rows_now(self, data) -> None:
        """Apply the row permutation to a layer that reads the file's layout (a private copy; the file's pages
        under the original need not stay resident)."""
        if self._row_perm is not None:
            self._raw = raw_bytes(take_rows(data, self.qtype, self._row_perm), self.qtype,
                                  (self.out_features, self.in_features))
            self._row_perm = None
            native.release_pages(data)

    def _rows_in_order(self) -> torch.Tensor:
        """The file-layout rows in the model's order (permuted on the fly while a repack is pending)."""
        raw, perm = self._raw, self._row_perm
        if perm is None or raw is None:
            return raw
        return torch.from_numpy(take_rows(raw.numpy(), self.qtype, perm))

    def x8(self) -> torch.Tensor | None:
        """The 8-row layout (None: the layer has none), made now if its repack is still pending."""
        if self._pending is not None:
            with repack.LOCK:
                if self._pending is not None:
                    self._x8 = self._lib.repack_x8(self._rows_in_order(), self.qtype, self.in_features)
                    self._row_perm = None
                    native.release_pages(self._pending)  # the file's pages: the forward never reads them again
                    self._raw = None  # dequantize() unpacks the 8-row layout (exact inverse)
                    self._pending = None
        return self._x8

    @property
    def _int4(self) -> Int4Packed | None:
        return None if self.int4_packed is None else Int4Packed(self.int4_packed, self.int4_scales, self._int4_group)

    @property
    def _dense(self) -> torch.Tensor | None:
        """The dense path's weight: the file's bytes seen as the compute dtype (no copy)."""
        return self._raw.view(self.compute_dtype) if self.path == "dense" else None

    @property
    def raw(self) -> torch.Tensor:
        """The weight in the file's layout, uint8 [out, bytes_per_row] (unpacked again when repacked)."""
        if self._pending is not None:
            self.x8()  # (a repack pending with a row permutation: its rows are not yet in order)
        raw = self._raw  # read once: a background repack sets _x8 before it drops _raw
        if raw is not None:
            return raw
        return self._lib.unrepack_x8(self.x8(), self.qtype, self.out_features, self.in_features, self._row_bytes)

    def _int4_rows(self, r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bt = block_type(self.qtype)
        codes, scale, zero = bt.int4_blocks(self._raw[r0:r1].reshape(-1, bt.type_size))
        n = r1 - r0
        return codes.reshape(n, -1), scale.reshape(n, -1), zero.reshape(n, -1)

    @property
    def native_max_batch(self) -> int:
        """Input rows up to which forward uses the exact native kernel (when it loads); 0: never.

        F32 in float32 is torch's own GEMV on the mapped array (already memory-bound); BF16 in
        bf16 goes native (5632x2048, one row: 0.8 ms vs 1.4 ms in torch's bf16, and float32)."""
        if not self._native_type or (self.path == "dense" and self.qtype == "F32"):
            return 0
        return _kernels.NATIVE_INT4_MAX_BATCH if self.path == "int4pack" else _kernels.NATIVE_MAX_BATCH

    def _dequant_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 as float32 for the blockwise path (natively into the thread's scratch:
        the result is valid until the next call)."""
        lib = native.library() if self._native_type else None
        if lib is not None:
            return lib.dequantize(self._raw[r0:r1], self.qtype, self.in_features,
                                  _kernels.scratch(r1 - r0, self.in_features))
        return dequantize_rows(self._raw[r0:r1], self.qtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rows(self.raw, self.qtype).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        if self.path == "triton":
            from .triton.ggml import matmul as triton_matmul

            # on the GPU prefills multiply float16 tiles on tensor cores (float32 accumulation); the CPU
            # interpreter, where the tests run, multiplies float32
            y = triton_matmul(x2d, self._raw, self.qtype, self.in_features, exact=x2d.device.type != "cuda")
            return _kernels.finish(y, x, self.bias, self.out_features)
        if self.path == "q8":
            lib = self._lib
            x8 = self.x8()
            if x8 is not None:
                y = lib.matmul_x8(x8, self.qtype, self.out_features, self.in_features, x2d)
            elif x2d.shape[0] <= _kernels.Q8_ROW_MAX_BATCH:
                y = lib.matmul_q8(self._raw, self.qtype, self.in_features, x2d)
            else:  # the file-layout kernel re-reads each block per 4 rows: a prefill dequantizes instead
                y = blockwise_matmul(x2d, self._dequant_rows, self.out_features, self.in_features, self.compute_dtype)
            return _kernels.finish(y, x, self.bias, self.out_features)
        lib = native.library() if x2d.shape[0] <= self.native_max_batch else None
        if lib is not None:
            y = lib.matmul(self._raw, self.qtype, self.in_features, x2d)
        elif self._int4 is not None and x2d.shape[0] <= _kernels.INT4PACK_MAX_BATCH:
            y = self._int4.matmul(x2d)
        elif self._dense is not None:
            y = x2d.to(self._dense.dtype) @ self._dense.t()
        else:
            dtype = torch.bfloat16 if self._int4 is not None else self.compute_dtype
            y = blockwise_matmul(x2d, self._dequant_rows, self.out_features, self.in_features, dtype)
        return _kernels.finish(y, x, self.bias, self.out_features)

    @property
    def nbytes(self) -> int:
        if self._x8 is not None or self._pending is not None:  # the 8-row layout: the same bytes, reordered
            raw = self._raw  # read once (see raw)
            w = raw.numel() if raw is not None else self._x8.numel()
        else:
            w = self._int4.nbytes if self._int4 is not None else self._raw.numel()
        return w + (0 if self.bias is None else self.bias.numel() * 4)

    @property
    def weight_is_dense(self) -> bool:
        return self.path == "dense"

    def q8_kernels(self):
        return self._lib if self.path == "q8" else None

    def x8_weight(self) -> X8Weight | None:
        x8 = self.x8()
        return None if x8 is None or self.bias is not None else X8Weight(self.qtype, x8, self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", path={self.path}"


class FileRows:
    """Rows of a table in a file, read with ``pread`` instead of through its memory mapping.

    A lookup through the mapping makes the kernel map the 64 KiB around every row it faults in
    (fault-around; ``MADV_RANDOM`` does not stop it), and those pages then count in the resident
    set: about 30 MB after a few hundred scattered tokens for a 37 MB table. Reading copies only
    the rows asked for. The descriptor is opened at once, so the file may be removed after load."""

    def __init__(self, path: str, offset: int, row_bytes: int):
        self.path, self.offset, self.row_bytes = path, offset, row_bytes
        self._fd: int | None = read_fd(path)

    def take(self, ids: list[int]) -> torch.Tensor | None:
        """uint8 [len(ids), row_bytes], or None when the file can no longer be read (use the mapping)."""
        if self._fd is None:
            try:
                self._fd = read_fd(self.path)
            except OSError:
                return None
        out = np.empty((len(ids), self.row_bytes), np.uint8)
        for i, t in enumerate(ids):
            if os.preadv(self._fd, [out[i]], self.offset + t * self.row_bytes) != self.row_bytes:
                return None
        return torch.from_numpy(out)

    def __getstate__(self) -> dict:  # a copy opens its own descriptor
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


class GGMLEmbedding(nn.Module):
    """Token lookup on a GGUF table that dequantizes only the rows it is asked for (read from the
    file when the table is a mapped file's, see :class:`FileRows`)."""

    def __init__(self, data: np.ndarray | torch.Tensor, qtype: str, shape: tuple[int, int]):
        super().__init__()
        self.num_embeddings, self.embedding_dim = shape
        self.qtype = qtype
        self.register_buffer("raw", raw_bytes(data, qtype, shape))
        where = native.mapped_file(data) if hasattr(os, "preadv") else None
        self._file = FileRows(where[0], where[1], self.raw.shape[1]) if where else None
        # the C dequantizer gives gguf-py's bits too, in microseconds for a decode step's rows (torch: ~0.2 ms)
        self._lib = native.library() if native.NativeKernels.supports(qtype) else None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [...] -> float32 [..., dim]."""
        flat = ids.reshape(-1)
        if self.raw.device.type != "cpu":  # on an accelerator: the rows of the table there, dequantized there
            return dequantize_rows(self.raw[flat], self.qtype).reshape(*ids.shape, self.embedding_dim)
        raw = None
        if self._file is not None and flat.numel() and 0 <= int(flat.min()) and int(flat.max()) < self.num_embeddings:
            raw = self._file.take(flat.tolist())
        raw = self.raw[flat] if raw is None else raw
        if self._lib is not None:
            rows = self._lib.dequantize(raw, self.qtype, self.embedding_dim)
        else:
            rows = dequantize_rows(raw, self.qtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rows(self.raw, self.qtype).to(dtype)

    def as_linear(self, compute_dtype: torch.dtype = torch.float32, kernels: str = "exact") -> GGMLLinear:
        """The same table as a tied output head over the same bytes (the int4pack path, and the
        q8 kernels' 8-row layout, add their packed copy; the other paths add nothing)."""
        return GGMLLinear(self.raw, self.qtype, (self.num_embeddings, self.embedding_dim),
                          compute_dtype=compute_dtype, kernels=kernels)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"


class DenseEmbedding(nn.Module):
    """A dense embedding table (dequantize mode)."""

    def __init__(self, weight: torch.Tensor, qtype: str = "F32"):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.qtype = qtype
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.weight).float()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.detach().to(dtype)

    def as_linear(self, compute_dtype: torch.dtype = torch.float32) -> DenseLinear:
        return DenseLinear(self.weight.detach(), qtype=self.qtype)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


MODES = ("inplace", "dequantize")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UnsupportedError(f"quant mode must be one of {', '.join(MODES)}, got {mode!r}")


def make_linear(
    data: np.ndarray | torch.Tensor, qtype: str, shape: tuple[int, int], bias: torch.Tensor | None = None,
    mode: str = "inplace", dtype: torch.dtype = torch.float32, kernels: str = "exact",
    row_perm: torch.Tensor | None = None,
) -> BaseLinear:
    """A base linear over raw GGUF data: in place (:class:`GGMLLinear`, ``dtype`` is its
    compute dtype, ``kernels`` its arithmetic) or dequantized once into a :class:`DenseLinear`
    of ``dtype``. ``row_perm``: the rows to take, in order (llama.cpp's q/k permutation undone)."""
    _check_mode(mode)
    if mode == "dequantize":
        if row_perm is not None:
            data = take_rows(data, qtype, row_perm)
        return DenseLinear(dequantize_array(data, qtype, shape).to(dtype), bias, qtype=qtype)
    return GGMLLinear(data, qtype, shape, bias, compute_dtype=dtype, kernels=kernels, row_perm=row_perm)


def make_embedding(
    data: np.ndarray | torch.Tensor, qtype: str, shape: tuple[int, int],
    mode: str = "inplace", dtype: torch.dtype = torch.float32,
) -> GGMLEmbedding | DenseEmbedding:
    """An embedding over raw GGUF data, looked up in place or dequantized once to ``dtype``."""
    _check_mode(mode)
    if mode == "dequantize":
        return DenseEmbedding(dequantize_array(data, qtype, shape).to(dtype), qtype=qtype)
    return GGMLEmbedding(data, qtype, shape)
