"""``x @ W.T`` with ``W`` a bitsandbytes layer's stored weight, dequantized tile by tile in the kernel.

4-bit (nf4 / fp4, ``Params4bit``): bitsandbytes' original layout, not its CPU repack: ``codes`` uint8
[out * in / 2], the weight [out, in] flattened row-major two codes per byte, element ``e`` in the high
nibble of byte ``e // 2`` when ``e`` is even, the low one when odd; ``code`` float32 [16] (``quant_state.code``);
``absmax`` one per ``blocksize`` elements of that flat order. Double quantization (nested) keeps ``absmax``
uint8 and adds ``code2`` float32 [256], ``absmax2`` float32 (one per ``blocksize2`` blocks) and ``offset``:
``absmax[b] = code2[absmax_u8[b]] * absmax2[b // blocksize2] + offset``; then ``w = code[nibble] *
absmax[e // blocksize]``, rounded to the state's dtype (``quant_state.dtype``) as ``dequantize_4bit`` is.
int8 (LLM.int8, ``Linear8bitLt``): ``cb`` int8 [out, in] and ``scb`` float32 [out]: ``w = cb * scb * (1/127)``
(``int8_vectorwise_dequant``'s float32 operations). This is the exact weight with float activations, NOT
bitsandbytes' int8 arithmetic (activations rounded to int8 with float16 outlier columns): the result is
``x @ dequantize().T``, which bitsandbytes' own forward only approximates.

Each program takes BLOCK_M input rows and BLOCK_N outputs and walks the input BLOCK_K columns at a time,
decoding that [BLOCK_K, BLOCK_N] slice (any ``in``: the tail is masked). Precision as :mod:`.gptq`:
``exact=True`` multiplies float32 tiles in IEEE float32 (bitsandbytes' dequantized weight, bit for bit);
otherwise tiles are rounded to float16 on tensor cores with float32 accumulation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .tiles import DECODE_MAX_ROWS, Tiled, configs, mma, start, store, x_tile

_ROUND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@triton.jit
def _weight(q, absmax, code, absmax2, code2, offset, n, k, K, blocksize, blocksize2, FMT: tl.constexpr,
            ROUND: tl.constexpr):
    """The float32 weight at rows ``n`` [1, BN] (int64) and columns ``k`` [BK, 1], as a [BK, BN] tile."""
    if FMT == 2:  # int8: cb * scb / 127, in int8_vectorwise_dequant's order
        w = tl.load(q + n * K + k).to(tl.float32) * tl.load(absmax + n) * 7.874015718698502e-3
    else:
        e = n * K + k  # the element's index in the flattened [out, in] weight
        byte = tl.load(q + e // 2).to(tl.int32)
        w = tl.load(code + tl.where(e % 2 == 0, byte >> 4, byte & 15))
        b = e // blocksize
        if FMT == 1:  # nested absmax: uint8 codes of its own 256-entry map, per blocksize2 blocks, plus offset
            a = tl.load(code2 + tl.load(absmax + b).to(tl.int32)) * tl.load(absmax2 + b // blocksize2)
            a = a + tl.load(offset)
        else:
            a = tl.load(absmax + b)
        w = w * a
        if ROUND == 1:  # to bfloat16, nearest-even, on the bits (Triton's interpreter truncates a .to())
            u = w.to(tl.uint32, bitcast=True)
            w = (((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
        elif ROUND == 2:
            w = w.to(tl.float16).to(tl.float32)
    return w


@triton.jit
def _matmul(x, q, absmax, code, absmax2, code2, offset, y, M, N, K, sxm, sym, blocksize, blocksize2,
            FMT: tl.constexpr, ROUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr, EXACT: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    m = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    n = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    nn = tl.where(n < N, n, 0).to(tl.int64)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kin = k < K
        kk = tl.where(kin, k, 0)
        w = _weight(q, absmax, code, absmax2, code2, offset, nn, kk.to(tl.int64)[:, None], K, blocksize,
                    blocksize2, FMT, ROUND)
        w = tl.where(kin[:, None], w, 0.0)  # [BK, BN]
        acc = mma(acc, x_tile(x, m, kk, kin, M, sxm), w, EXACT, BLOCK_M)
    store(y, acc, m, n, M, N, sym)


def _check(what: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], numel: int) -> torch.Tensor:
    if t.dtype not in dtypes or t.numel() != numel:
        raise ValueError(f"{what} must be {' or '.join(str(d) for d in dtypes)} with {numel} values, got "
                         f"{t.dtype} {list(t.shape)}")
    return t.contiguous().reshape(-1)


def _run(x2d, tensors, N, K, blocksize, blocksize2, fmt, round_to, exact):
    x2d, y = start(x2d, K, N, "bitsandbytes", *tensors)
    M = x2d.shape[0]
    if M == 0:
        return y
    q, absmax, code, absmax2, code2, offset = tensors
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))  # noqa: E731
    (_DECODE if M <= DECODE_MAX_ROWS else _PREFILL).launch(
        grid, x2d, q, absmax, code, absmax2, code2, offset, y, M, N, K, x2d.stride(0), y.stride(0), blocksize,
        blocksize2, FMT=fmt, ROUND=_ROUND[round_to], EXACT=exact)
    return y


#: decode (up to DECODE_MAX_ROWS input rows): one row per program, multiply-and-reduce; above, tensor-core tiles
_DECODE = Tiled(_matmul, dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=32),
                configs(BLOCK_M=(1,), BLOCK_N=(16, 32, 64, 128), BLOCK_K=(32, 64, 128, 256), num_warps=(1, 2, 4)))
_PREFILL = Tiled(_matmul, dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=32),
                 configs(BLOCK_M=(16, 32, 64), BLOCK_N=(64, 128), BLOCK_K=(32, 64)))


def matmul_4bit(x2d: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int,
                shape: tuple[int, int], *, absmax2: torch.Tensor | None = None, code2: torch.Tensor | None = None,
                offset: torch.Tensor | None = None, blocksize2: int = 256, dtype: torch.dtype = torch.float32,
                exact: bool = False) -> torch.Tensor:
    """``x2d [M, in] @ W.T`` -> float32 [M, out] for a 4-bit weight of ``shape`` (out, in) in bitsandbytes'
    layout (nested when ``absmax2`` is given; ``dtype``: the quant_state's, which the weight is rounded to)."""
    N, K = (int(d) for d in shape)
    if blocksize <= 0 or blocksize2 <= 0:
        raise ValueError(f"block sizes must be positive, got {blocksize} and {blocksize2}")
    if dtype not in _ROUND:
        raise ValueError(f"the weight's dtype must be one of {', '.join(map(str, _ROUND))}, got {dtype}")
    blocks = -(-N * K // blocksize)
    codes = _check("codes", codes, (torch.uint8,), -(-N * K // 2))
    code = _check("code", code, (torch.float32,), 16)
    nested = absmax2 is not None
    if not nested:
        absmax = _check("absmax", absmax, (torch.float32,), blocks)
        absmax2 = code2 = offset = absmax  # unread
    else:
        if code2 is None or offset is None:
            raise ValueError("a nested absmax needs code2 and offset with absmax2")
        absmax = _check("nested absmax", absmax, (torch.uint8,), blocks)
        absmax2 = _check("absmax2", absmax2, (torch.float32,), -(-blocks // blocksize2))
        code2 = _check("code2", code2, (torch.float32,), 256)
        offset = _check("offset", offset, (torch.float32,), 1)
    return _run(x2d, (codes, absmax, code, absmax2, code2, offset), N, K, blocksize, blocksize2,
                int(nested), dtype, exact)


def matmul_int8(x2d: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """``x2d [M, in] @ W.T`` -> float32 [M, out], ``W = cb * scb / 127`` (LLM.int8's weight, float activations)."""
    if cb.dtype != torch.int8 or cb.dim() != 2:
        raise ValueError(f"cb must be int8 [out, in], got {cb.dtype} {list(cb.shape)}")
    N, K = cb.shape
    scb = _check("scb", scb, (torch.float32,), N)
    cb = cb.contiguous()
    return _run(x2d, (cb, scb, scb, scb, scb, scb), N, K, 1, 1, 2, torch.float32, exact)
