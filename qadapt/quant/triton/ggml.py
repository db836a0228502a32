"""``x @ W.T`` with ``W`` in GGUF blocks (Q8_0, Q4_0, Q4_K, Q6_K), dequantized tile by tile in the kernel.

The weight stays the file's bytes, uint8 [out, bytes_per_row] (no dense copy, no repack): each program
takes BLOCK_N weight rows and BLOCK_M input rows and walks the row 32 elements at a time (every type's
blocks or sub-blocks are whole multiples of 32), decoding that 32-wide slice of BLOCK_N rows from its
block (scales in half precision, codes in nibbles / bytes / 2-bit high planes) into float32. What
differs per type is one decode function below, selected by ``QT``; block geometry is gguf-py's table.

Precision: ``exact=True`` multiplies float32 tiles in IEEE float32 (the reference numbers up to
accumulation order); otherwise tiles are rounded to float16 and multiplied on tensor cores with float32
accumulation (relative rounding 2^-11 per factor: about 1e-3 of a logit's scale; the decode default,
where the weight's own quantization error is ~10x larger).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..types import block_geometry
from .tiles import Tiled, configs, mma, start, store, x_tile

#: GGUF type -> the kernel's ``QT`` (the decode function's branch)
TYPES = {"Q8_0": 0, "Q4_0": 1, "Q4_K": 2, "Q6_K": 3}


@triton.jit
def _f16(p):
    """The float16 stored little-endian at byte pointer(s) ``p``, as float32."""
    lo = tl.load(p).to(tl.uint16)
    hi = tl.load(p + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _tile(w, rows, k0, QT: tl.constexpr):
    """Elements k0..k0+31 of the weight rows at byte offsets ``rows`` [BN, 1], float32 [BN, 32]."""
    lane = tl.arange(0, 32)[None, :]
    if QT == 0:  # Q8_0: f16 d, 32 x int8
        base = rows + (k0 // 32) * 34
        q = tl.load(w + base + 2 + lane).to(tl.int8, bitcast=True).to(tl.float32)
        out = _f16(w + base) * q
    elif QT == 1:  # Q4_0: f16 d, 16 bytes: element j < 16 the low nibble of byte j, j >= 16 the high of j - 16
        base = rows + (k0 // 32) * 18
        byte = tl.load(w + base + 2 + (lane % 16)).to(tl.int32)
        nib = tl.where(lane < 16, byte & 15, byte >> 4)
        out = _f16(w + base) * (nib - 8).to(tl.float32)
    elif QT == 2:  # Q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins for 8 sub-blocks, 128 bytes of nibbles
        base = rows + (k0 // 256) * 144
        j = (k0 % 256) // 32  # the sub-block
        byte = tl.load(w + base + 16 + (j // 2) * 32 + lane).to(tl.int32)
        nib = tl.where(j % 2 == 0, byte & 15, byte >> 4)
        s = w + base + 4
        lo_j = tl.load(s + j).to(tl.int32)
        hi_j = tl.load(s + j + 4).to(tl.int32)
        lo_m = tl.load(s + tl.where(j >= 4, j - 4, j)).to(tl.int32)
        sc = tl.where(j < 4, lo_j & 63, (hi_j & 15) | ((lo_m >> 6) << 4))
        mn = tl.where(j < 4, hi_j & 63, (hi_j >> 4) | ((lo_j >> 6) << 4))
        out = _f16(w + base) * sc.to(tl.float32) * nib.to(tl.float32) - _f16(w + base + 2) * mn.to(tl.float32)
    else:  # Q6_K: 128 bytes low nibbles, 64 bytes 2-bit high planes, 16 int8 scales, f16 d (last)
        base = rows + (k0 // 256) * 210
        p = k0 % 256
        n = p // 128
        quarter = (p % 128) // 32
        ql = tl.load(w + base + 64 * n + (quarter % 2) * 32 + lane).to(tl.int32)
        ql = tl.where(quarter < 2, ql & 15, ql >> 4)
        qh = tl.load(w + base + 128 + 32 * n + lane).to(tl.int32)
        q = (ql | (((qh >> (2 * quarter)) & 3) << 4)) - 32
        sc = tl.load(w + base + 192 + 8 * n + lane // 16 + 2 * quarter).to(tl.int8, bitcast=True).to(tl.float32)
        out = _f16(w + base + 208) * sc * q.to(tl.float32)
    return out


@triton.jit
def _matmul(x, w, y, M, N, K, row_bytes, sxm, sym, QT: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, EXACT: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (tl.where(n < N, n, 0).to(tl.int64) * row_bytes)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    lane = tl.arange(0, 32)
    for k0 in range(0, K, 32):
        wt = _tile(w, rows, k0, QT)  # [BN, 32]
        acc = mma(acc, x_tile(x, m, k0 + lane, lane < 32, M, sxm), tl.trans(wt), EXACT)
    store(y, acc, m, n, M, N, sym)


@triton.jit
def _gemv(x, w, y, M, N, K, row_bytes, sxm, sym, QT: tl.constexpr, BLOCK_N: tl.constexpr):
    """One input row per program row: the decode step (no tensor cores; the weight's bytes are the cost)."""
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (tl.where(n < N, n, 0).to(tl.int64) * row_bytes)[:, None]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    lane = tl.arange(0, 32)
    for k0 in range(0, K, 32):
        wt = _tile(w, rows, k0, QT)
        xt = tl.load(x + pm.to(tl.int64) * sxm + k0 + lane).to(tl.float32)
        acc += tl.sum(wt * xt[None, :], axis=1)
    tl.store(y + pm.to(tl.int64) * sym + n, acc, mask=n < N)


@triton.jit
def _dequantize(w, out, N, K, row_bytes, QT: tl.constexpr, BLOCK_N: tl.constexpr):
    pn = tl.program_id(0)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (tl.where(n < N, n, 0).to(tl.int64) * row_bytes)[:, None]
    lane = tl.arange(0, 32)
    for k0 in range(0, K, 32):
        tl.store(out + n[:, None].to(tl.int64) * K + k0 + lane[None, :], _tile(w, rows, k0, QT), mask=n[:, None] < N)


GEMV_MAX_ROWS = 4  # input rows up to which the GEMV kernel runs (decode); above, the tiled one


def check(raw: torch.Tensor, qtype: str, in_features: int) -> tuple[int, int]:
    """(out_features, bytes per row) of ``raw``, refusing what the kernels cannot take (by name)."""
    if qtype not in TYPES:
        raise ValueError(f"the Triton GGUF kernels take {', '.join(TYPES)}, not {qtype}")
    per, size = block_geometry(qtype)
    if in_features % per:
        raise ValueError(f"{qtype}: {in_features} columns are not whole blocks of {per}")
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != in_features // per * size:
        raise ValueError(f"{qtype} weight must be uint8 [out, {in_features // per * size}] for {in_features} "
                         f"columns, got {raw.dtype} {list(raw.shape)}")
    return raw.shape[0], raw.shape[1]


def matmul(x2d: torch.Tensor, raw: torch.Tensor, qtype: str, in_features: int, exact: bool = False) -> torch.Tensor:
    """``x2d [M, in] @ W.T`` -> float32 [M, out], ``W`` the GGUF rows ``raw`` (on x's device)."""
    out, row_bytes = check(raw, qtype, in_features)
    x2d, y = start(x2d, in_features, out, "GGUF weight", raw)
    M = x2d.shape[0]
    if M == 0:
        return y
    raw = raw.contiguous()
    args = (x2d, raw, y, M, out, in_features, row_bytes, x2d.stride(0), y.stride(0))
    if M <= GEMV_MAX_ROWS:
        _GEMV.launch(lambda meta: (M, triton.cdiv(out, meta["BLOCK_N"])), *args, QT=TYPES[qtype])
    else:
        _MATMUL.launch(lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(out, meta["BLOCK_N"])), *args,
                       QT=TYPES[qtype], EXACT=exact)
    return y


_GEMV = Tiled(_gemv, dict(BLOCK_N=64), configs(BLOCK_N=(8, 16, 32, 64, 128), num_warps=(1, 2, 4)))
_MATMUL = Tiled(_matmul, dict(BLOCK_M=16, BLOCK_N=64), configs(BLOCK_M=(16, 32, 64), BLOCK_N=(32, 64, 128)))


def dequantize(raw: torch.Tensor, qtype: str, in_features: int) -> torch.Tensor:
    """The dense float32 weight [out, in] of GGUF rows ``raw``, on their device."""
    out, row_bytes = check(raw, qtype, in_features)
    w = torch.empty(out, in_features, dtype=torch.float32, device=raw.device)
    bn = 32
    _dequantize[(triton.cdiv(out, bn),)](raw.contiguous(), w, out, in_features, row_bytes, QT=TYPES[qtype],
                                         BLOCK_N=bn)
    return w
