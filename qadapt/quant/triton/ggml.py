"""``x @ W.T`` with ``W`` in GGUF blocks, dequantized tile by tile in the kernel: Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS (:data:`TYPES`; the IQ2/IQ3 grids are not here).

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
from .tiles import DECODE_MAX_ROWS, Tiled, configs, mma, start, store, x_tile

#: GGUF type -> the kernel's ``QT`` (the decode function's branch)
TYPES = {"Q8_0": 0, "Q4_0": 1, "Q4_K": 2, "Q6_K": 3, "Q4_1": 4, "Q5_0": 5, "Q5_1": 6, "Q2_K": 7, "Q3_K": 8,
         "Q5_K": 9, "IQ4_NL": 10, "IQ4_XS": 11}


@triton.jit
def _f16(p):
    """The float16 stored little-endian at byte pointer(s) ``p``, as float32."""
    lo = tl.load(p).to(tl.uint16)
    hi = tl.load(p + 1).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _nibble(w, at, lane):
    """Element ``lane`` (0..31) of a 32-value run stored as 16 bytes at ``at``: low nibbles first, then high."""
    byte = tl.load(w + at + (lane % 16)).to(tl.int32)
    return tl.where(lane < 16, byte & 15, byte >> 4)


@triton.jit
def _bit(w, at, lane):
    """Bit ``lane`` of the little-endian 32-bit mask at ``at`` (Q5_0 / Q5_1's fifth bits)."""
    return (tl.load(w + at + lane // 8).to(tl.int32) >> (lane % 8)) & 1


@triton.jit
def _k_scale_min(s, j):
    """Q4_K / Q5_K: sub-block ``j``'s 6-bit scale and min from the 12 packed bytes at ``s``."""
    lo_j = tl.load(s + j).to(tl.int32)
    hi_j = tl.load(s + j + 4).to(tl.int32)
    lo_m = tl.load(s + tl.where(j >= 4, j - 4, j)).to(tl.int32)
    sc = tl.where(j < 4, lo_j & 63, (hi_j & 15) | ((lo_m >> 6) << 4))
    mn = tl.where(j < 4, hi_j & 63, (hi_j >> 4) | ((lo_j >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _iq4(n):
    """IQ4's non-linear levels (llama.cpp's kvalues_iq4nl) at codes ``n`` (0..15)."""
    return tl.where(n < 8,
                    tl.where(n < 4, tl.where(n < 2, tl.where(n == 0, -127, -104), tl.where(n == 2, -83, -65)),
                             tl.where(n < 6, tl.where(n == 4, -49, -35), tl.where(n == 6, -22, -10))),
                    tl.where(n < 12, tl.where(n < 10, tl.where(n == 8, 1, 13), tl.where(n == 10, 25, 38)),
                             tl.where(n < 14, tl.where(n == 12, 53, 69), tl.where(n == 14, 89, 113))))


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
        out = _f16(w + base) * (_nibble(w, base + 2, lane) - 8).to(tl.float32)
    elif QT == 2 or QT == 9:  # Q4_K / Q5_K: f16 d, f16 dmin, 12 bytes of 6-bit scales/mins for 8 sub-blocks,
        # (Q5_K: 32 bytes of fifth bits, bit j of byte l for sub-block j,) then nibbles: 32 bytes per 2 sub-blocks
        size: tl.constexpr = 144 if QT == 2 else 176
        base = rows + (k0 // 256) * size
        j = (k0 % 256) // 32  # the sub-block
        byte = tl.load(w + base + (16 if QT == 2 else 48) + (j // 2) * 32 + lane).to(tl.int32)
        q = tl.where(j % 2 == 0, byte & 15, byte >> 4)
        if QT == 9:
            q = q | (((tl.load(w + base + 16 + lane).to(tl.int32) >> j) & 1) << 4)
        sc, mn = _k_scale_min(w + base + 4, j)
        out = _f16(w + base) * sc * q.to(tl.float32) - _f16(w + base + 2) * mn
    elif QT == 4:  # Q4_1: f16 d, f16 m, 16 bytes of nibbles
        base = rows + (k0 // 32) * 20
        out = _f16(w + base) * _nibble(w, base + 4, lane).to(tl.float32) + _f16(w + base + 2)
    elif QT == 5:  # Q5_0: f16 d, 32 fifth bits, 16 bytes of nibbles; codes centred on 16
        base = rows + (k0 // 32) * 22
        q = (_nibble(w, base + 6, lane) | (_bit(w, base + 2, lane) << 4)) - 16
        out = _f16(w + base) * q.to(tl.float32)
    elif QT == 6:  # Q5_1: f16 d, f16 m, 32 fifth bits, 16 bytes of nibbles
        base = rows + (k0 // 32) * 24
        q = _nibble(w, base + 8, lane) | (_bit(w, base + 4, lane) << 4)
        out = _f16(w + base) * q.to(tl.float32) + _f16(w + base + 2)
    elif QT == 7:  # Q2_K: 16 bytes of 4-bit scale|min per 16 values, 64 bytes of 2-bit codes, f16 d, f16 dmin
        base = rows + (k0 // 256) * 84
        p = k0 % 256
        q = (tl.load(w + base + 16 + (p // 128) * 32 + lane).to(tl.int32) >> (2 * ((p % 128) // 32))) & 3
        sc = tl.load(w + base + p // 16 + lane // 16).to(tl.int32)
        dl = _f16(w + base + 80) * (sc & 15).to(tl.float32)
        ml = _f16(w + base + 82) * (sc >> 4).to(tl.float32)
        out = dl * q.to(tl.float32) - ml
    elif QT == 8:  # Q3_K: 32 bytes of high-bit masks, 64 bytes of 2-bit codes, 12 bytes of 6-bit scales, f16 d
        base = rows + (k0 // 256) * 110
        p = k0 % 256
        ql = (tl.load(w + base + 32 + (p // 128) * 32 + lane).to(tl.int32) >> (2 * ((p % 128) // 32))) & 3
        hb = (tl.load(w + base + lane).to(tl.int32) >> (p // 32)) & 1
        q = ql - ((hb ^ 1) << 2)  # the high bit set means no offset
        i = p // 16 + lane // 16  # the 16-value group, its scale: 4 low bits and 2 high bits
        lo = (tl.load(w + base + 96 + i % 8).to(tl.int32) >> (4 * (i // 8))) & 15
        hi = (tl.load(w + base + 104 + i % 4).to(tl.int32) >> (2 * (i // 4))) & 3
        sc = ((lo | (hi << 4)) - 32).to(tl.float32)
        out = (_f16(w + base + 108) * sc) * q.to(tl.float32)
    elif QT == 10:  # IQ4_NL: f16 d, 16 bytes of nibbles indexing the non-linear levels
        base = rows + (k0 // 32) * 18
        out = _f16(w + base) * _iq4(_nibble(w, base + 2, lane)).to(tl.float32)
    elif QT == 11:  # IQ4_XS: f16 d, 16-bit high scale bits, 4 bytes of low scale nibbles, 128 bytes of nibbles
        base = rows + (k0 // 256) * 136
        j = (k0 % 256) // 32
        lo = (tl.load(w + base + 4 + j // 2).to(tl.int32) >> (4 * (j % 2))) & 15
        hbits = tl.load(w + base + 2).to(tl.int32) | (tl.load(w + base + 3).to(tl.int32) << 8)
        sc = ((lo | (((hbits >> (2 * j)) & 3) << 4)) - 32).to(tl.float32)
        out = (_f16(w + base) * sc) * _iq4(_nibble(w, base + 8 + j * 16, lane)).to(tl.float32)
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
        acc = mma(acc, x_tile(x, m, k0 + lane, lane < 32, M, sxm), tl.trans(wt), EXACT, BLOCK_M)
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


GEMV_MAX_ROWS = DECODE_MAX_ROWS  # input rows up to which the GEMV kernel runs (decode); above, the tiled one


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
